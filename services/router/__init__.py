"""The router service: picks workers for each request and drives it through them."""
