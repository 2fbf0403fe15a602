# Sourced by the GPU scripts (gpu_serving.sh, gpu_kv_transports.sh) on a device without a package
# index: carried wheels from .whl, a trimmed NIXL from .nixl (trim_nixl.py), redis-server and its
# libraries from .redis; `pagewire` importable through symlinks (pyproject's package-dir mapping)
# in /tmp. Prints the device, the software and the commit to $OUT/device.txt.
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site
fi
if ls .nixl/*.tar.gz >/dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  mkdir -p /tmp/nixl && tar xzf .nixl/*.tar.gz -C /tmp/nixl
  export PYTHONPATH=/tmp/nixl${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -x .redis/redis-server ]; then  # wrapped: only redis sees its carried libraries
  mkdir -p /tmp/pw-bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/.redis/lib exec %s/.redis/redis-server "$@"\n' \
    "$PWD" "$PWD" > /tmp/pw-bin/redis-server
  chmod +x /tmp/pw-bin/redis-server
  export PATH=/tmp/pw-bin:$PATH
fi
# OFFLINE_ONLY=1: the offline engine alone (no services, no Redis): for calls whose carry
# limit goes to other things (gpu_spec_decode.sh carries the embedded model's weights).
if [ -z "${OFFLINE_ONLY:-}" ]; then
  redis-server --version || { echo "no working redis-server"; return 1; }
fi
# pagewire -> shared, pagewire.{kernels,services,bench} -> their folders, without writing here.
rm -rf /tmp/pw && mkdir -p /tmp/pw/pagewire
for f in shared/*; do ln -sfn "$PWD/$f" /tmp/pw/pagewire/; done
ln -sfn "$PWD/kernels" /tmp/pw/pagewire/kernels
ln -sfn "$PWD/services" /tmp/pw/pagewire/services
ln -sfn "$PWD/loadtests/bench" /tmp/pw/pagewire/bench
export PYTHONPATH=/tmp/pw:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/device.txt" || return 1
import os
import torch, triton
import pagewire.llm
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
line = f"gpus: {gpus or 'none'} | torch {torch.__version__} | triton {triton.__version__}"
if not os.environ.get("OFFLINE_ONLY"):
    import fastapi, grpc, grpc_health, redis, uvicorn
    import pagewire.bench, pagewire.launcher, pagewire.services.gateway.app
    from pagewire.kv_transport.nixl_agent import nixl_available
    line += (f" | grpcio {grpc.__version__} | fastapi {fastapi.__version__} | nixl "
             f"{nixl_available()}")
print(line)
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,clocks.sm \
  --format=csv,noheader | tee -a "$OUT/device.txt"
if [ -f SNAPSHOT ]; then cat SNAPSHOT; else git log -1 --format='commit %h %s'; fi 2>/dev/null \
  | tee -a "$OUT/device.txt"
