import pytest
import torch

from diffusers_mask2dit import MASK_VARIANTS, SceneLayout, build_dense_mask
from diffusers_mask2dit.layout import allowed_pair_fraction, check_mask_variant


def _kinds_and_scenes(layout):
    kinds, scenes = [], []
    for kind in ("text", "video"):
        for index, (start, end) in enumerate(layout.segments(kind)):
            kinds += [kind] * (end - start)
            scenes += [index] * (end - start)
    return kinds, scenes


# METHOD.md's table, written out independently of the rule table in layout.py.
EXPECTED = {
    "v1": lambda qk, qs, kk, ks: qs == ks,
    "v2": lambda qk, qs, kk, ks: (qk == kk == "video") or qs == ks,
    "v3": lambda qk, qs, kk, ks: qk == kk or qs == ks,
    "full": lambda qk, qs, kk, ks: True,
}


@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_dense_mask_matches_method_table(variant):
    layout = SceneLayout([3, 2, 4], [5, 1, 3])
    mask = build_dense_mask(layout, variant)
    kinds, scenes = _kinds_and_scenes(layout)
    assert mask.shape == (layout.total, layout.total) and mask.dtype == torch.bool
    for q in range(layout.total):
        for k in range(layout.total):
            assert bool(mask[q, k]) == EXPECTED[variant](kinds[q], scenes[q], kinds[k], scenes[k])


def test_v2_is_symmetric_and_keeps_most_pairs_at_paper_scale():
    layout = SceneLayout([3, 2], [4, 6])
    mask = build_dense_mask(layout, "v2")
    assert torch.equal(mask, mask.T)
    paper = SceneLayout.uniform(3, 226, 17550)
    assert 0.97 < allowed_pair_fraction(paper, "v2") < 0.99
    assert allowed_pair_fraction(paper, "full") == 1.0
    small = SceneLayout([3, 2], [4, 6])
    assert allowed_pair_fraction(small, "v1") == pytest.approx(build_dense_mask(small, "v1").float().mean().item())


def test_layout_offsets():
    layout = SceneLayout([2, 3], [4, 1])
    assert layout.segments("text") == [(0, 2), (2, 5)]
    assert layout.segments("video") == [(5, 9), (9, 10)]
    assert layout.region("video") == (5, 10) and layout.total == 10 and layout.num_scenes == 2


@pytest.mark.parametrize(
    "text, video, message",
    [([], [], "at least one scene"), ([2, 0], [3, 3], "empty scenes"), ([2], [3, 3], "one entry per scene"), ([2, -1], [1, 1], "positive")],
)
def test_bad_layouts_raise(text, video, message):
    with pytest.raises(ValueError, match=message):
        SceneLayout(text, video)


def test_sequence_length_check_and_variants():
    layout = SceneLayout([2], [3])
    with pytest.raises(ValueError, match="adds up to 5"):
        layout.check_sequence_length(6)
    assert check_mask_variant(2) == "v2" and check_mask_variant("V3") == "v3" and check_mask_variant("v5") == "full"
    for bad in ("v4", 4, "causal", None, True):
        with pytest.raises(ValueError, match="mask"):
            check_mask_variant(bad)


def test_dense_mask_is_built_on_the_device_asked_for():
    layout = SceneLayout([3, 2], [5, 4])
    on_meta = build_dense_mask(layout, "v2", device="meta")  # no data: shows the mask is made there, not copied
    assert on_meta.device.type == "meta" and on_meta.shape == (layout.total, layout.total)
    assert torch.equal(build_dense_mask(layout, "v2", device=torch.device("cpu")), build_dense_mask(layout, "v2"))
