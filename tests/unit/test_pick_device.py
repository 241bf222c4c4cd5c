"""`unmask sample --device` and `unmask eval --device`: auto picks a GPU only when there is one; a device this
machine lacks is a clear error naming the flag and the fix, before any model is loaded."""

import pytest
import torch

from unmask.cli import main
from unmask.errors import ConfigError
from unmask.inference import pick_device


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_gpu_on_a_machine_without_one_names_the_flag_and_the_fix(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no CUDA GPU; use --device cpu"):
        pick_device("cuda:1")
    with pytest.raises(ConfigError, match="'gpu0' is not a device: use auto, cpu, cuda or cuda:N"):
        pick_device("gpu0")
    assert main(["sample", "--checkpoint", str(tmp_path / "nowhere"), "--device", "cuda"]) == 2
    assert "--device cuda: this machine has no CUDA GPU" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e.json"),
                 "--device", "cuda:0"]) == 2
    assert "--device cuda:0: this machine has no CUDA GPU" in capsys.readouterr().err
