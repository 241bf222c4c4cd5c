"""Speed reports count what they claim (timings are reported, never asserted), and the plot is a PNG."""

import pytest
import torch

from unmask.config import ModelConfig
from unmask.data.special import SpecialTokens
from unmask.diffusion.sampler import SamplerConfig
from unmask.diffusion.sampler_template import prompt_template
from unmask.eval.plot import plot_quality_vs_steps
from unmask.eval.speed import measure_speed, speed_sweep
from unmask.model.build import build_model

SP = SpecialTokens()


@pytest.mark.slow  # trains or starts a process: tens of seconds on 2 loaded cores
def test_speed_counts_generated_tokens_and_nfe():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"))
    template, _ = prompt_template([[7, 8], [9]], 20, SP)
    speed, res = measure_speed(model, template, SamplerConfig(steps=8), SP, repeats=2)
    assert speed.generated_tokens == 17 + 18 and 1 <= speed.nfe <= 8
    assert speed.tokens_per_second > 0 and speed.seconds > 0
    rows = speed_sweep(model, template, SamplerConfig(), SP, steps=[4, 64], compare_cache=True)
    assert [(r.steps, r.cache) for r in rows] == [(4, True), (4, False), (64, True), (64, False)]
    assert rows[3].nfe == 64 and rows[2].nfe < 64  # without the cache every step calls the network


def test_plot_writes_a_png(tmp_path):
    path = plot_quality_vs_steps({"ancestral": [(64, 80.0), (16, 120.0), (256, 60.0)], "remask": [(16, 90.0)]},
                                 tmp_path / "plots" / "quality.png", references={"real text": 40.0},
                                 title="genppl vs steps")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
