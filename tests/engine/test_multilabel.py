"""Multi-label classification (VOC 2007 layout): the loss skips "difficult" entries, the metric is mAP."""
import json
import math

import numpy as np
import pytest
import torch
from engine_helpers import BACKBONE, MODEL_KWARGS, run_main
from PIL import Image

from monatune.data import VOC_CLASSES
from monatune.tasks import ImageClassifier

# image id: (objects as (class, difficult)); the picture's red, green, blue show cat, dog, person
VOC_IMAGES = {
    "trainval": {
        "000001": [("cat", 0)], "000002": [("dog", 0)], "000003": [("person", 0)],
        "000004": [("cat", 0), ("dog", 0)], "000005": [("dog", 0), ("person", 0)],
        "000006": [("cat", 0), ("person", 1)], "000007": [("cat", 0)], "000008": [("dog", 0)],
        "000009": [("person", 0)], "000010": [("cat", 0), ("person", 0)],
        "000011": [("dog", 1), ("person", 0)], "000012": [("cat", 0), ("dog", 0)],
    },
    "test": {
        "000101": [("cat", 0)], "000102": [("dog", 0), ("person", 0)], "000103": [("person", 0)],
        "000104": [("cat", 0), ("dog", 1)], "000105": [("dog", 0)],
    },
}  # fmt: skip
CHANNEL = {"cat": 0, "dog": 1, "person": 2}


def voc_xml(objects: list[tuple[str, int]]) -> str:
    box = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>"
    body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult>{box}</object>" for n, d in objects)
    return f"<annotation><filename>x.jpg</filename>{body}</annotation>"


@pytest.fixture
def voc(tmp_path):
    """``VOCdevkit/VOC2007`` as torchvision lays it out, with 12 trainval and 5 test images."""
    base = tmp_path / "voc" / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, images in VOC_IMAGES.items():
        for image_id, objects in images.items():
            color = np.zeros(3)
            for name, _ in objects:
                color[CHANNEL[name]] = 255
            pixels = (color + rng.normal(0, 30, (40, 40, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg")
            (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return tmp_path / "voc"


def test_multilabel_fit_scores_map(configs, voc, tmp_path):
    run_dir = tmp_path / "run"
    code = run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--data.init_args.root", voc,
                    "--data.init_args.multilabel", "true", "--trainer.max_epochs", 1)  # fmt: skip
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["monitor"] == "val/mAP"
    assert 0 <= results["best"] <= 1 and results["best"] == results["last"]
    assert results["steps"] == 2  # 12 images, batches of 8
    assert results["parameters"]["head"] == 32 * 8 * len(VOC_CLASSES) + len(VOC_CLASSES)  # one output per VOC class
    best = json.loads((run_dir / "adapter-best" / "adapter_config.json").read_text())["metadata"]
    assert best["val/mAP"] == pytest.approx(results["best"])


@pytest.fixture
def multilabel_classifier() -> ImageClassifier:
    model = ImageClassifier(BACKBONE, num_classes=2, multilabel=True, model_kwargs=MODEL_KWARGS)
    model.configure_model()  # builds the network and the metrics
    return model


def test_multilabel_loss_ignores_minus_one(multilabel_classifier):
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    target = torch.tensor([[1.0, -1.0], [0.0, -1.0]])
    loss = multilabel_classifier.loss(logits, target)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE-with-logits: softplus(-x) for 1, softplus(x) for 0
    assert loss.item() == pytest.approx((softplus(-2.0) + softplus(0.5)) / 2)  # the mean over the 2 known entries
    loss.backward()
    assert logits.grad[:, 1].tolist() == [0.0, 0.0]  # the ignored entries get no gradient
    moved = logits.detach() * torch.tensor([1.0, -5.0])  # only the ignored column changes
    assert multilabel_classifier.loss(moved, target).item() == pytest.approx(loss.item())


def test_map_leaves_out_minus_one(multilabel_classifier):
    # class 0, ranked by score: 0.95 (ignored), 0.9 +, 0.8 -, 0.3 +  -> AP = (1/1 + 2/3) / 2 = 5/6
    #   (counted as a negative instead it would be (1/2 + 2/4) / 2 = 1/2)
    # class 1, ranked: 0.7 -, 0.6 +, 0.4 (ignored), 0.2 -            -> AP = 1/2
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.6], [0.3, 0.4], [0.95, 0.7]])
    target = torch.tensor([[1, 0], [0, 1], [1, -1], [-1, 0]])
    metric = multilabel_classifier.val_metric
    metric.update(torch.logit(scores), target)  # logits, as the task passes them
    assert multilabel_classifier.monitor == "val/mAP"
    assert metric.compute().item() == pytest.approx((5 / 6 + 1 / 2) / 2)
