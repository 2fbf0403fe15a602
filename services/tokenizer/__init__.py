"""The tokenizer service (gRPC, pagewire.v1.Tokenizer): text and chat to token ids, and
incremental detokenization back to text. A thin layer over pagewire.tokenizer; run it with
`python -m pagewire.services.tokenizer.server --port 50051`."""
