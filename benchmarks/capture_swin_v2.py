"""Dynamo capture of a tiny Mona-tuned model at several sizes (counting backend): seconds for each first call, the
largest difference from eager, graphs so far. Run by hand on 2026-12-05 (docs/benchmarks.md, issue 21)."""
import torch, time
from timm.models.swin_transformer_v2 import PatchMerging
import monatune
from monatune.models.swin_v2 import TunedSwinV2Block, DensePatchMergingV2
TINY = dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4))
torch.manual_seed(0)
b = monatune.build_dense_backbone("swinv2_tiny_window8_256", "mona", bottleneck=8, model_kwargs=dict(TINY, img_size=64, window_size=4)).eval()
for m in b.modules():
    if isinstance(m, TunedSwinV2Block):
        m.norm1.weight.data.normal_(1, .1); m.norm2.weight.data.normal_(1, .1)
print([ (blk.window_size, blk.shift_size) for l in b.layers for blk in l.blocks])
def ref(x):
    for m in b.modules():
        if isinstance(m, TunedSwinV2Block): m.dense_windows = False
        elif type(m) is DensePatchMergingV2: m.__class__ = PatchMerging
    try:
        return b(x)
    finally:
        for m in b.modules():
            if isinstance(m, TunedSwinV2Block): m.dense_windows = True
            elif type(m) is PatchMerging: m.__class__ = DensePatchMergingV2
with torch.no_grad():
    for size in [(64,64),(33,47),(97,131),(45,71)]:
        x = torch.randn(2,3,*size)
        a, r = b(x), ref(x)
        print(size, [ (tuple(a[k].shape), (a[k]-r[k]).abs().max().item()) for k in a])
from torch._dynamo.testing import CompileCounter
g = CompileCounter()
c = torch.compile(b, dynamic=True, backend=g)
with torch.no_grad():
    for size in [(96,128),(128,160),(97,131),(200,136)]:
        t=time.time(); x=torch.randn(1,3,*size); e=b(x); o=c(x)
        print(size, time.time()-t, max((o[k]-e[k]).abs().max().item() for k in e), g.frame_count)
