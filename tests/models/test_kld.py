"""The KLD box loss (monatune.models.oriented.gaussian) against the release's GDLoss_v1 and the Gaussians' KL."""
import math

import pytest
import torch
from rotated_retinanet_reference import gdloss_v1_kld, xy_wh_r_2_xy_sigma
from rotated_retinanet_reference import kld_loss as release_kld
from torch.distributions import MultivariateNormal, kl_divergence

from monatune.models.oriented.gaussian import box_to_gaussian, divergence, kld_level_loss, kld_loss

PI = math.pi


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_boxes(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
    size = 4 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 80
    angle = (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * 2 * PI
    return torch.cat([centre, size, angle], dim=1).to(dtype)


def near(boxes, seed, dtype=torch.float32):
    """Boxes near ``boxes`` (a few px, 20%, 0.3 rad apart), as predictions near their targets."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(boxes.shape, generator=g, dtype=torch.float64)
    out = boxes.double().clone()
    out[:, :2] += noise[:, :2] * 4
    out[:, 2:4] *= (noise[:, 2:4] * 0.2).exp()
    out[:, 4] += noise[:, 4] * 0.3
    return out.to(dtype)


def release(pred, target, **kw):
    return release_kld(xy_wh_r_2_xy_sigma(pred), xy_wh_r_2_xy_sigma(target), **kw)[:, 0]


@pytest.mark.parametrize("fun, tau", [("log1p", 1.0), ("sqrt", 1.0), ("log1p", 2.0)])
def test_matches_release_transliteration(fun, tau):
    target = random_boxes(300, 0, torch.float64)
    pred = torch.cat([near(target[:200], 1, torch.float64), random_boxes(100, 2, torch.float64)])  # near and far
    ours, theirs = kld_loss(pred, target, fun=fun, tau=tau), release(pred, target, fun=fun, tau=tau)
    assert ours.shape == (300,)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)  # float64: the same function
    ours32 = kld_loss(pred.float(), target.float(), fun=fun, tau=tau)
    torch.testing.assert_close(ours32, theirs.float(), rtol=1e-4, atol=1e-5)
    mu, sigma = box_to_gaussian(target)
    ref_mu, ref_sigma = xy_wh_r_2_xy_sigma(target)
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(sigma, ref_sigma)


def test_gradients_match_release_transliteration():
    target = random_boxes(50, 3, torch.float64)
    pred = near(target, 4, torch.float64).requires_grad_()
    kld_loss(pred, target).sum().backward()
    ours = pred.grad.clone()
    pred.grad = None
    release(pred, target).sum().backward()
    torch.testing.assert_close(ours, pred.grad, rtol=1e-7, atol=1e-10)


def test_divergence_is_twice_the_gaussians_kl():
    target = random_boxes(40, 5, torch.float64)
    pred = near(target, 6, torch.float64)
    mu_p, sigma_p = box_to_gaussian(pred)
    mu_t, sigma_t = box_to_gaussian(target)
    kl = kl_divergence(MultivariateNormal(mu_p, sigma_p), MultivariateNormal(mu_t, sigma_t))
    torch.testing.assert_close(divergence(pred, target), 2 * kl, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kld_loss(pred, target), 1 - 1 / (1 + torch.log1p(2 * kl)), rtol=1e-9, atol=1e-12)


def test_hand_cases():
    box = torch.tensor([[50.0, 40.0, 30.0, 10.0, 0.3]], dtype=torch.float64)
    # identical boxes: D = 0, clamped to 1e-6
    torch.testing.assert_close(kld_loss(box, box), 1 - 1 / (1 + torch.log1p(torch.tensor([1e-6], dtype=torch.float64))))
    assert kld_loss(box, box).item() < 1.1e-6
    # a shift along the target's w axis by w/2: D = 4 (w/2)^2 / w^2 = 1
    shifted = box.clone()
    shifted[0, 0] += 15 * math.cos(0.3)
    shifted[0, 1] += 15 * math.sin(0.3)
    torch.testing.assert_close(divergence(shifted, box), torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(kld_loss(shifted, box), torch.tensor([1 - 1 / (1 + math.log(2))], dtype=torch.float64))
    # prediction twice as wide: trace 4 + 1, log-det 2 ln(1/2): D = 5 - 2 ln 2 - 2
    wide = box.clone()
    wide[0, 2] = 60
    torch.testing.assert_close(divergence(wide, box), torch.tensor([3 - 2 * math.log(2)], dtype=torch.float64))


def test_invariant_to_the_box_description():
    target = random_boxes(60, 7)
    pred = near(target, 8)
    base = kld_loss(pred, target)
    turned = pred.clone()
    turned[:, 4] += PI  # the same rectangle turned by 180 degrees
    torch.testing.assert_close(kld_loss(turned, target), base, rtol=1e-4, atol=1e-5)
    swapped = target[:, [0, 1, 3, 2, 4]].clone()
    swapped[:, 4] += PI / 2  # w and h swapped, a quarter turn: the same rectangle ('oc' vs 'le90')
    torch.testing.assert_close(kld_loss(pred, swapped), base, rtol=1e-4, atol=1e-5)
    # not symmetric in its arguments (KL(p || t) != KL(t || p))
    assert not torch.allclose(kld_loss(target, pred), base, rtol=1e-3)


def test_level_reduction_is_the_release_per_level_mean_sum():
    target = random_boxes(6, 9)
    pred = near(target, 10).requires_grad_()
    levels = torch.tensor([0, 0, 2, 4, 4, 4])
    per_box = kld_loss(pred, target)
    expected = per_box[:2].mean() + per_box[2] + per_box[3:].mean()
    torch.testing.assert_close(kld_level_loss(pred, target, levels, 5), expected)
    # the release: one GDLoss_v1 call per level on all anchors (weights 1 at the positives), then sum(l.mean())
    anchors_per_level = 7
    release_levels = []
    for lvl in range(5):
        weight = torch.zeros(anchors_per_level, 5)
        p, t = torch.ones(anchors_per_level, 5), torch.ones(anchors_per_level, 5)
        picked = (levels == lvl).nonzero()[:, 0]
        p[: len(picked)], t[: len(picked)] = pred[picked], target[picked]
        weight[: len(picked)] = 1
        release_levels.append(gdloss_v1_kld(p, t, weight, avg_factor=123.0))
    torch.testing.assert_close(kld_level_loss(pred, target, levels, 5), sum(v.mean() for v in release_levels))
    kld_level_loss(pred, target, levels, 5, loss_weight=2.0).backward()
    assert pred.grad.abs().sum() > 0
    empty = torch.zeros(0, 5, requires_grad=True)
    zero = kld_level_loss(empty, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 5)
    assert zero.item() == 0 and zero.requires_grad


def test_bad_arguments_are_refused():
    box = torch.tensor([[1.0, 1, 2, 2, 0]])
    with pytest.raises(ValueError, match="fun"):
        kld_loss(box, box, fun="exp")
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        kld_loss(box[:, :4], box[:, :4])
    with pytest.raises(ValueError, match=r"\[\.\.\., 5\]"):
        box_to_gaussian(box[:, :4])
