"""Weight decay as the release's optimiser builds it: mmcv 1.x paramwise_cfg on the release's parameter names.

The paper configs' rules are applied through ``configure_optimizers`` to tiny versions of the paper models, and
compared with mmcv 1.x's ``DefaultOptimizerConstructor.add_params`` written out by hand on the names the release's
mmdet 2.11 / mmseg 0.11 models give the same parameters. Parameters are found by their module's type and role
(the first Mona, the first BatchNorm of a head), not by monatune's current names.
"""
from pathlib import Path

import pytest
import yaml
from torch import nn

from monatune.adapters.mona import Mona
from monatune.engine.decay import check_paramwise, mmcv_param_groups
from monatune.tasks import ImageClassifier, ObjectDetector, SemanticSegmenter

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1))
COCO, COCO_MASK = "det/coco_cascade_mask_rcnn_swin_b_3x.yaml", "det/coco_mask_rcnn_swin_b_3x.yaml"
VOC, ADE = "det/voc_retinanet_swin_l.yaml", "seg/ade20k_upernet_swin_l.yaml"
CLASSIFICATION = ["cls/flowers102_swin_l.yaml", "cls/pets_swin_l.yaml", "cls/voc2007_swin_l.yaml",
                  "cls/voc2007_multilabel_swin_l.yaml"]  # fmt: skip
RECIPE = ("lr", "lr_scale", "weight_decay", "paramwise", "paramwise_by_method")


def config_init(path: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / path).read_text())["model"]["init_args"]


def paper_task(path: str, method: str):
    """A tiny version of the config's model with the config's optimiser recipe, built and configured."""
    init = config_init(path)
    recipe = {k: init[k] for k in RECIPE if k in init}
    if path.startswith("seg/"):
        task = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method=method, model_kwargs=TINY,
                                 channels=16, aux_channels=8, **recipe)  # fmt: skip
    elif path.startswith("det/"):
        extra = {"detector_kwargs": {"head_channels": 16}} if init["detector"] == "cascade_mask_rcnn" else {}
        task = ObjectDetector("swin_tiny_patch4_window7_224", detector=init["detector"], num_classes=3, method=method,
                              model_kwargs=TINY, fpn_channels=16, frozen_stages=init.get("frozen_stages", -1),
                              **extra, **recipe)  # fmt: skip
    else:
        task = ImageClassifier("swin_tiny_patch4_window7_224", num_classes=5, method=method, model_kwargs=TINY, **recipe)
    task.configure_model()
    return task


def optimiser_groups(task) -> dict[str, tuple[float, float]]:
    """(lr, weight_decay) of every trainable parameter as AdamW receives it, keyed by its name in monatune's network."""
    task._schedule_length = lambda: (10, 10)
    optimizer = task.configure_optimizers()["optimizer"]
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = {n: p for n, p in task.model.named_parameters() if p.requires_grad}
    assert set(map(id, named.values())) == set(by_id)  # every trainable parameter, once
    return {n: by_id[id(p)] for n, p in named.items()}


def mmcv_by_hand(release_name: str, local: str, kind: str, cfg: dict, base_wd: float) -> float:
    """mmcv 1.x DefaultOptimizerConstructor.add_params, written out for one parameter (its weight decay)."""
    keys = cfg.get("custom_keys", {})
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in release_name:
            value = keys[key]
            return base_wd * (value if isinstance(value, float) else value.get("decay_mult", 1.0))
    if kind == "norm":
        return base_wd * cfg.get("norm_decay_mult", 1.0)
    if kind == "dwconv":
        return base_wd * cfg.get("dwconv_decay_mult", 1.0)
    if local == "bias":
        return base_wd * cfg.get("bias_decay_mult", 1.0)
    return base_wd


def first(model: nn.Module, kind: type, inside: nn.Module | None = None, outside: nn.Module | None = None) -> str:
    """The name of the first module of type ``kind`` in ``model`` (within ``inside``, not within ``outside``)."""
    skip = {id(m) for m in outside.modules()} if outside is not None else set()
    keep = {id(m) for m in inside.modules()} if inside is not None else None
    return next(n for n, m in model.named_modules()
                if isinstance(m, kind) and id(m) not in skip and (keep is None or id(m) in keep))  # fmt: skip


def representative(task) -> dict[str, tuple[str, str]]:
    """monatune name -> (the release's name for the same parameter, the kind of module that holds it)."""
    model, backbone = task.model, task.tuned
    at = next(n for n, m in model.named_modules() if m is backbone)
    bb = f"{at}." if at else ""
    block = f"{bb}layers.2.blocks.1."  # timm's Swin names are the release's
    table = {
        block + "norm1.weight": ("backbone.layers.2.blocks.1.norm1.weight", "norm"),
        block + "attn.relative_position_bias_table": ("backbone.layers.2.blocks.1.attn.relative_position_bias_table",
                                                      "other"),
        block + "attn.qkv.bias": ("backbone.layers.2.blocks.1.attn.qkv.bias", "other"),
        block + "mlp.fc2.weight": ("backbone.layers.2.blocks.1.mlp.fc2.weight", "other"),
        f"{bb}layers.2.downsample.norm.weight": ("backbone.layers.2.downsample.norm.weight", "norm"),
    }  # fmt: skip
    if task.method == "mona":
        mona = first(model, Mona)  # the release: my_module_1 of the first block
        release = "backbone.layers.0.blocks.0.my_module_1."
        table = {
            f"{mona}.gamma": (release + "gamma", "other"),
            f"{mona}.gammax": (release + "gammax", "other"),
            f"{mona}.norm.weight": (release + "norm.weight", "norm"),
            f"{mona}.norm.bias": (release + "norm.bias", "norm"),
            f"{mona}.project1.bias": (release + "project1.bias", "other"),
            f"{mona}.adapter_conv.conv1.bias": (release + "adapter_conv.conv1.bias", "dwconv"),
            f"{mona}.adapter_conv.projector.bias": (release + "adapter_conv.projector.bias", "other"),
        }
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    bn = first(model, nn.BatchNorm2d, outside=backbone) if has_bn else None
    if isinstance(task, SemanticSegmenter):
        table[f"{bn}.weight"] = ("decode_head.psp_modules.0.1.bn.weight", "norm")
        table[f"{bn}.bias"] = ("decode_head.psp_modules.0.1.bn.bias", "norm")
        aux_bn = first(model, nn.BatchNorm2d, inside=model.aux_head)
        table[f"{aux_bn}.weight"] = ("auxiliary_head.convs.0.bn.weight", "norm")
    elif isinstance(task, ObjectDetector):
        fpn = first(model, nn.Conv2d, inside=model.backbone, outside=backbone)
        table[f"{fpn}.weight"] = ("neck.lateral_convs.0.conv.weight", "other")
        table[f"{fpn}.bias"] = ("neck.lateral_convs.0.conv.bias", "other")
        if bn is not None:  # the R-CNN box heads' 4 convs: ConvModule(conv, bn) as SyncBN
            table[f"{bn}.weight"] = ("roi_head.bbox_head.0.shared_convs.0.bn.weight", "norm")
            table[f"{bn}.bias"] = ("roi_head.bbox_head.0.shared_convs.0.bn.bias", "norm")
    return table


def check_against_mmcv(task, path: str) -> dict[str, tuple[float, float]]:
    init = config_init(path)
    cfg = (init.get("paramwise_by_method") or {}).get(task.method, init["paramwise"])
    got = optimiser_groups(task)
    table = representative(task)
    for name, (release_name, kind) in table.items():
        assert name in got, f"{name} is not a trainable parameter"
        expected = mmcv_by_hand(release_name, name.rsplit(".", 1)[1], kind, cfg, init["weight_decay"])
        assert got[name][1] == pytest.approx(expected), (name, release_name)
    assert {lr for lr, _ in got.values()} == {task.lr}  # no lr_mult other than 1 in the paper configs
    return got


@pytest.mark.parametrize("path", [COCO, COCO_MASK, VOC])
@pytest.mark.parametrize("method", ["mona", "full"])
def test_detection_configs_decay_as_the_release(path, method):
    """Only names with 'norm' and the position tables go undecayed: biases, heads' BatchNorms, Mona's scales decay."""
    task = paper_task(path, method)
    got = check_against_mmcv(task, path)
    inside = {n for n, _ in task.tuned.named_parameters()}
    norms = {f"{n}.{p}" for n, m in task.model.named_modules() if isinstance(m, nn.LayerNorm)
             for p, _ in m.named_parameters(recurse=False)}  # fmt: skip
    prefix = next(n for n, m in task.model.named_modules() if m is task.tuned)
    for name, (_, wd) in got.items():
        local = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        if local in inside and (name in norms or local.endswith("relative_position_bias_table")):
            assert wd == 0.0, name  # every LayerNorm of the release's Swin and Mona is named norm*
        else:
            assert wd == 0.05, name  # the release's heads and neck hold no name with 'norm' (ConvModule's 'bn')
    if method == "mona":
        mona = first(task.model, Mona)
        assert got[f"{mona}.gamma"][1] == got[f"{mona}.gammax"][1] == 0.05  # timm's rule: 0 (1-D)


@pytest.mark.parametrize("method", ["mona", "full"])
def test_ade20k_mona_decays_everything_full_spares_norms(method):
    """The release's ADE20K Mona config adds 'backbone': lr_mult 1, longer than 'norm': every parameter decays."""
    task = paper_task(ADE, method)
    got = check_against_mmcv(task, ADE)
    backbone_norms = {f"backbone.{n}.{p}" for n, m in task.tuned.named_modules() if isinstance(m, nn.LayerNorm)
                      for p, _ in m.named_parameters(recurse=False)}  # fmt: skip
    assert backbone_norms & set(got)
    for name, (_, wd) in got.items():
        if method == "mona":
            assert wd == 0.01, name
        else:
            spared = name in backbone_norms or name.endswith("relative_position_bias_table")
            assert wd == (0.0 if spared else 0.01), name  # heads' BatchNorms ('bn' in mmseg) decay


@pytest.mark.parametrize("path", CLASSIFICATION)
def test_classification_rule_spares_norms_and_biases_but_not_depthwise_biases_or_scales(path):
    """mmcls's Swin recipe: norm_decay_mult 0, bias_decay_mult 0, position tables 0; mmcv's depthwise-conv rule
    comes before the bias rule, so a Mona's depthwise-convolution biases are decayed."""
    init = config_init(path)
    assert init["paramwise"] == {"norm_decay_mult": 0.0, "bias_decay_mult": 0.0,
                                 "custom_keys": {".absolute_pos_embed": 0.0, ".relative_position_bias_table": 0.0}}
    task = paper_task(path, "mona")
    got = check_against_mmcv(task, path)
    mona = first(task.model, Mona)
    assert got[f"{mona}.adapter_conv.conv1.bias"][1] == 0.05
    assert got[f"{mona}.adapter_conv.projector.bias"][1] == got[f"{mona}.project1.bias"][1] == 0.0
    assert got[f"{mona}.norm.weight"][1] == 0.0 and got[f"{mona}.gamma"][1] == 0.05
    assert got["head.fc.weight"][1] == 0.05 and got["head.fc.bias"][1] == 0.0


def test_release_names_of_the_parts():
    det = paper_task(COCO, "mona")
    names = {det.release_name(n).split(".")[0] for n, p in det.model.named_parameters() if p.requires_grad}
    assert names == {"backbone", "neck", "rpn_head", "roi_head"}
    seg = paper_task(ADE, "mona")
    names = {seg.release_name(n).split(".")[0] for n, p in seg.model.named_parameters() if p.requires_grad}
    assert names == {"backbone", "decode_head", "auxiliary_head"}
    voc = paper_task(VOC, "full")
    names = {voc.release_name(n).split(".")[0] for n, p in voc.model.named_parameters() if p.requires_grad}
    assert names == {"backbone", "neck", "bbox_head"}
    clf = paper_task(CLASSIFICATION[0], "full")
    assert clf.release_name("head.fc.weight") == "head.fc.weight"
    assert clf.release_name("layers.0.blocks.0.norm1.weight") == "backbone.layers.0.blocks.0.norm1.weight"


def test_lr_mult_of_a_custom_key_reaches_the_optimiser():
    seg = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method="mona", model_kwargs=TINY,
                            channels=16, aux_channels=8, lr=1e-3, weight_decay=0.01,
                            paramwise={"custom_keys": {"backbone": {"lr_mult": 0.1}, "decode_head": 0.5}})  # fmt: skip
    seg.configure_model()
    got = optimiser_groups(seg)
    mona = first(seg.model, Mona)
    assert got[f"{mona}.norm.weight"] == pytest.approx((1e-4, 0.01))  # 'backbone' (8 chars) before nothing else
    assert got["decode_head.conv_seg.weight"] == pytest.approx((1e-3, 0.005))
    assert got["aux_head.conv_seg.weight"] == pytest.approx((1e-3, 0.01))


def test_default_rule_is_timms():
    seg = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method="mona", model_kwargs=TINY,
                            channels=16, aux_channels=8, weight_decay=0.01)  # fmt: skip
    seg.configure_model()
    got = optimiser_groups(seg)
    mona = first(seg.model, Mona)
    assert got[f"{mona}.gamma"][1] == 0.0 and got[f"{mona}.project1.bias"][1] == 0.0  # 1-D: no decay
    assert got[f"{mona}.project1.weight"][1] == 0.01
    bn = first(seg.model, nn.BatchNorm2d, outside=seg.tuned)
    assert got[f"{bn}.weight"][1] == 0.0


def test_per_method_rule_replaces_the_common_one():
    common, mona_rule = {"custom_keys": {"norm": 0.0}}, {"custom_keys": {"backbone": 1.0, "norm": 0.0}}
    got = {}
    for method in ("mona", "norm"):
        seg = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method=method, model_kwargs=TINY,
                                channels=16, aux_channels=8, weight_decay=0.01, paramwise=common,
                                paramwise_by_method={"mona": mona_rule})  # fmt: skip
        seg.configure_model()
        got[method] = (optimiser_groups(seg), seg)
    groups, seg = got["mona"]
    assert groups[f"{first(seg.model, Mona)}.norm.weight"][1] == 0.01  # Mona's rule: 'backbone' first
    assert got["norm"][0]["backbone.norm3.weight"][1] == 0.0  # every other method: the common rule


def test_longest_key_first_and_bad_rules():
    model = nn.Sequential(nn.LayerNorm(4))
    groups = mmcv_param_groups(model, 1.0, 0.1, {"custom_keys": {"0": 0.5, "0.weight": 0.0}})
    assert {n: g["weight_decay"] for g in groups for n in g["names"]} == {"0.weight": 0.0, "0.bias": pytest.approx(0.05)}
    groups = mmcv_param_groups(model, 1.0, 0.1, {"custom_keys": {"ab": 0.5, "0.": 0.0}}, lambda n: "x0.ab")
    assert {g["weight_decay"] for g in groups} == {0.0}  # equal lengths: alphabetical ('0.' before 'ab')
    with pytest.raises(ValueError, match="unknown paramwise"):
        check_paramwise({"keys": {}})
    with pytest.raises(ValueError, match="custom key 'norm'"):
        check_paramwise({"custom_keys": {"norm": "none"}})
