"""ObjectDetector under a Lightning Trainer: learns, reports COCO AP, saves and reloads adapter + heads."""
import json

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from monatune.engine import AdapterCheckpoint, RunSummary
from monatune.tasks.detection import ObjectDetector

SWIN = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4}


class Squares(Dataset):
    """Bright squares (class 1) and bars (class 2) on dark noise; targets in torchvision's format."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            image = torch.rand(3, 64, 64, generator=g) * 0.2
            x, y = (torch.randint(0, 30, (2,), generator=g)).tolist()
            image[:, y : y + 24, x : x + 24] = 0.9
            bx, by = (torch.randint(0, 40, (2,), generator=g)).tolist()
            image[:, by : by + 20, bx : bx + 6] = 0.6
            boxes = torch.tensor([[x, y, x + 24, y + 24], [bx, by, bx + 6, by + 20]], dtype=torch.float32)
            self.items.append((image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "iscrowd": torch.zeros(2, dtype=torch.int64)}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    return {"images": [i for i, _ in items], "targets": [t for _, t in items], "skipped": 0}


class Data(L.LightningDataModule):
    num_classes = 2

    def train_dataloader(self):
        return DataLoader(Squares(8, 0), batch_size=4, shuffle=True, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(Squares(4, 1), batch_size=4, collate_fn=collate)


def module(**kwargs):
    return ObjectDetector("swin_tiny_patch4_window7_224", detector="retinanet", model_kwargs=SWIN, method="mona",
                          method_options={"bottleneck": 8}, min_size=64, max_size=64, lr=5e-4, **kwargs)


def test_detector_fits_reports_ap_and_round_trips_its_adapter(tmp_path):
    L.seed_everything(0)
    model = module()
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        callbacks=[AdapterCheckpoint(), RunSummary()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(model, Data())
    import csv

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4]), losses
    maps = [float(r["val/map"]) for r in rows if r.get("val/map")]
    assert len(maps) == 8 and all(0.0 <= m <= 1.0 for m in maps)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["monitor"] == "val/map" and results["method"] == "mona"
    best = tmp_path / "adapter-best"
    assert (best / "task_head.safetensors").is_file() and (best / "adapter_model.safetensors").is_file()

    # the adapter-only files + heads rebuild the trained detector's outputs exactly
    L.seed_everything(0)  # same frozen backbone init (stands for the pretrained file)
    fresh = module(num_classes=2, adapter=str(tmp_path / "adapter-last"))
    fresh.configure_model()
    images = [Squares(1, 5)[0][0]]
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(images)[0], fresh(images)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
