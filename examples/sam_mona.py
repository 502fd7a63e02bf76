"""Tune SAM's image encoder with Mona and train its mask decoder on a folder of label masks.

Mona goes into every block of SAM's ViT image encoder, the mask decoder trains in full, the
prompt encoder stays frozen. The data are read by monatune's segmentation data path
(:func:`monatune.data.segmentation.read_masks`: ``root/images/<split>/*.jpg`` with one label PNG
each in ``root/masks/<split>/``); for each class in an image, the box around its pixels is the
prompt and its pixels are the target mask (BCE + Dice on the decoder's mask, ignored pixels left
out). The adapter (Mona + mask decoder, about a tenth of SAM ViT-B) is saved with
:func:`monatune.save_adapter`.

    python examples/sam_mona.py --checkpoint sam_vit_b_01ec64.pth --model vit_b \
        --data data/my_masks --classes data/my_masks/classes.txt --out runs/sam-mona

The official SAM checkpoints are plain state dicts of tensors; they are read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import monatune
from monatune.data.segmentation import collate_segmentation, read_masks, segmentation_transforms


def class_prompts(mask: Tensor, ignore_index: int = 255) -> Iterator[tuple[Tensor, Tensor]]:
    """For each class in a label mask: its box (x0, y0, x1, y1) and its binary mask."""
    for label in mask.unique().tolist():
        if label == ignore_index:
            continue
        target = mask == label
        ys, xs = torch.nonzero(target, as_tuple=True)
        box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        yield box, target


def mask_loss(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy plus Dice of one predicted mask, over the valid (not ignored) pixels."""
    logits, target = logits[valid], target[valid].float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def sam_step(sam: nn.Module, images: Tensor, masks: Tensor) -> Tensor:
    """The loss of one batch: every class of every image, prompted by its box.

    ``images`` are float [0, 1] (B, 3, H, W) with H, W at most the encoder's input size; ``masks``
    (B, H, W) labels with 255 for ignored pixels. SAM's own ``forward`` runs without gradients, so
    the encoder, prompt encoder and decoder are called one by one.
    """
    size = tuple(images.shape[-2:])
    embeddings = sam.image_encoder(sam.preprocess(images * 255.0))
    losses = []
    for embedding, mask in zip(embeddings, masks):
        for box, target in class_prompts(mask):
            sparse, dense = sam.prompt_encoder(points=None, boxes=box[None], masks=None)
            low_res, _ = sam.mask_decoder(
                image_embeddings=embedding[None],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits = sam.postprocess_masks(low_res, size, size)[0, 0]
            losses.append(mask_loss(logits, target, mask != 255))
    return torch.stack(losses).mean()


def train(sam: nn.Module, data: Any, *, epochs: int, lr: float, batch_size: int = 2) -> list[float]:
    """Mona in the image encoder, the mask decoder trainable; AdamW over what trains. Returns the epoch losses."""
    monatune.apply(sam, "mona", head=["mask_decoder"])
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate_segmentation)
    history = []
    sam.train()
    for _ in range(epochs):
        total, steps = 0.0, 0
        for batch in loader:
            loss = sam_step(sam, batch["images"], batch["masks"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        history.append(total / max(steps, 1))
    return history


def main(argv: list[str] | None = None) -> None:
    from segment_anything import sam_model_registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="official SAM weights (sam_vit_b_01ec64.pth, ...)")
    parser.add_argument("--model", default="vit_b", choices=sorted(sam_model_registry))
    parser.add_argument("--data", required=True, help="folder with images/<split> and masks/<split>")
    parser.add_argument("--classes", required=True, help="class names, one per line")
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", type=int, default=1024, help="training crop side (at most SAM's 1024)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/sam-mona")
    args = parser.parse_args(argv)

    sam = sam_model_registry[args.model]()
    sam.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    transforms = segmentation_transforms(True, crop_size=args.size, scale=(args.size * 2, args.size), mean=None)
    data = read_masks(args.data, args.split, classes=args.classes, transforms=transforms)
    for epoch, loss in enumerate(train(sam, data, epochs=args.epochs, lr=args.lr), 1):
        print(f"epoch {epoch}: loss {loss:.4f}")
    print(f"saved {monatune.save_adapter(sam, Path(args.out))}")


if __name__ == "__main__":
    main()
