"""Parity with the official UniFormer video implementation, checkable without its code.

`data/official_logits.json` holds logits computed by the OFFICIAL model
(Sense-X/UniFormer, video_classification/slowfast/models/uniformer.py, class `Uniformer`,
built in a throwaway script outside this repository with its config stubbed) in eval mode,
fp32 on CPU, after `load_state_dict(seeded_state_dict(...), strict=True)` and on
`seeded_input(...)`, both defined below. Here we build ours with the same generated weights
and require the same logits. The generator and input are pinned by checksums in the fixture,
so a change in torch's random streams reads as such and not as a model regression.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from model import create_uniformer

FIXTURE = Path(__file__).parent / "data" / "official_logits.json"


def seeded_state_dict(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic, well-conditioned values for every entry of `template`, in sorted key order.

    Kernels and matrices get variance 0.5 / fan_in, norm scales 1 +- 0.1, biases and BN means
    small, BN running variances in [0.5, 1.5): activations stay O(1) through the whole network.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(template):
        shape = tuple(template[key].shape)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.int64)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=gen) * math.sqrt(0.5 / math.prod(shape[1:]))
        else:  # LayerNorm / BatchNorm scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return out


def seeded_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def weights_checksum(state: dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().abs().sum() for v in state.values()))


CASES = json.loads(FIXTURE.read_text())["cases"]


@pytest.mark.parametrize("layout", ["tokens", "channels_first"])
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_matches_official_logits(case_name, layout):
    case = CASES[case_name]
    net = create_uniformer(case["variant"], num_classes=case["num_classes"], layout=layout).eval()
    state = seeded_state_dict(net.state_dict(), case["weight_seed"])
    x = seeded_input(tuple(case["input_shape"]), case["input_seed"])
    assert weights_checksum(state) == pytest.approx(case["weights_abs_sum"], rel=1e-9), "weight generator changed"
    assert float(x.double().sum()) == pytest.approx(case["input_sum"], rel=1e-9), "input generator changed"

    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = net(x)
    expected = torch.tensor(case["logits"])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4
