#!/usr/bin/env bash
# Issue 7's GPU checks and tables in one short run, for a session lent an NVIDIA machine.
#
# From the device tool (the machine's image has torch, timm, lightning; monatune runs from src/):
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=570)
# Results land in $OUT (JSON of each bench run, the parity and module outputs, the log).
# Budget: about 6-7 minutes after the machine is up. BATCH (default 128) sets the
# classification batch; the detection-sized run is 2x3x800x1333.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
BATCH="${BATCH:-128}"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== 1. Mona on CUDA: fused / plain / release agree (fp32), autocast takes the plain path, compile =="
timeout 150 python3 - <<'EOF' | tee "$OUT/parity.txt"
import torch
from monatune.adapters.mona import Mona

torch.manual_seed(0)
mona = Mona(256).cuda().train()
with torch.no_grad():
    for p in mona.parameters():
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 256 else 0.0))
x = torch.randn(4, 28, 28, 256, device="cuda", requires_grad=True)
g = torch.randn_like(x)
assert mona._can_fuse(x), "fp32 CUDA input should take the fused path"
res = {}
for impl in ("fused", "plain", "release"):
    mona.impl = impl
    mona.zero_grad(set_to_none=True); x.grad = None
    torch.manual_seed(1)
    out = mona(x)
    out.backward(g)
    res[impl] = [out.detach()] + [x.grad.clone()] + [p.grad.clone() for p in mona.parameters()]
rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
for impl in ("fused", "release"):
    worst = max(rel(a, b) for a, b in zip(res[impl], res["plain"]))
    print(f"{impl} vs plain, worst relative error over output and gradients: {worst:.2e}")
    assert worst < 1e-4, impl
mona.impl = "fused"
for dtype in (torch.bfloat16, torch.float16):
    torch.manual_seed(1)  # the same dropout mask as the fp32 runs
    with torch.autocast("cuda", dtype=dtype):
        assert not mona._can_fuse(x)
        out = mona(x)
    out.float().backward(g)
    print(f"autocast {dtype}: output {out.dtype}, relative error vs fp32 {rel(out.float(), res['plain'][0]):.2e}")
compiled = torch.compile(mona, fullgraph=True)  # inductor; a graph break raises
torch.manual_seed(1)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = compiled(x)
out.float().backward(g)
print("torch.compile(fullgraph=True) under bf16 autocast: ok, relative error", f"{rel(out.float(), res['plain'][0]):.2e}")
EOF
echo "parity exit: $?"

echo "== 2. Mona module fwd+bwd per Swin-B stage on CUDA (fp32) =="
timeout 60 python3 benchmarks/mona_module.py --device cuda --batch 32 --repeats 21 | tee "$OUT/mona_module_cuda.txt"

B="python3 -m monatune bench --device cuda --steps 10 --warmup 3 --quiet"
echo "== 3. Swin-B, batch $BATCH, bf16 autocast =="
timeout 150 $B --methods full,mona,mona-release,fixed --batch-size "$BATCH" --precision bf16-mixed --output "$OUT/cls_bf16"
echo "== 4. Swin-B, batch $BATCH, fp32 =="
timeout 110 $B --methods full,mona,fixed --batch-size "$BATCH" --output "$OUT/cls_fp32"
echo "== 5. detection-sized input 2x3x800x1333, bf16 autocast =="
timeout 110 $B --methods full,mona,fixed --batch-size 2 --input-size 800x1333 --precision bf16-mixed --output "$OUT/det_bf16"
echo "== 6. batch $BATCH, bf16 autocast, memory options on =="
timeout 90 $B --methods full,mona --batch-size "$BATCH" --precision bf16-mixed --checkpointing --frozen-precision bf16 --output "$OUT/cls_bf16_options"
rm -f "$OUT"/*/bench.md  # the tables are in the log; at most 8 files come back
echo "== done =="
