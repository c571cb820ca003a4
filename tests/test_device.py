"""Device selection and mixed precision of the trainers, and the throughput benchmark at a tiny size."""

import json

import pytest
import throughput  # benchmarks/ is on the path (conftest)
import torch

from fedcontrast.methods.device import amp_dtype, autocast, float32_loss, grad_scaler, resolve_device
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.losses import info_nce
from fedcontrast.methods.registry import get_method


def test_amp_is_chosen_per_device_and_off_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu, "bf16") is None and amp_dtype(cpu, "fp16") is None
    assert amp_dtype(cuda, "bf16") == torch.bfloat16 and amp_dtype(cuda, "fp16") == torch.float16
    assert amp_dtype(cuda, "off") is None
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype(cpu, "fp8")
    with autocast(cpu, "bf16"):
        assert not torch.is_autocast_enabled("cpu")
    assert not grad_scaler(cpu, "fp16").is_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_site():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="site-3: device cuda:0 was asked for"):
        resolve_device("cuda:0", "site-3")


def test_losses_run_in_float32_under_autocast():
    # CPU autocast in bfloat16 stands in for the GPU's: the loss must come out float32, unchanged
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    expected = info_nce(queries, keys[:2], keys[2:], 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(queries, torch.eye(16))  # a bf16 forward output
        assert projected.dtype == torch.bfloat16
        loss = info_nce(projected, keys[:2], keys[2:], 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)  # only the bf16 rounding of the input

    @float32_loss
    def seen(x: torch.Tensor) -> tuple[torch.dtype, bool]:
        return x.dtype, torch.is_autocast_enabled("cpu")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert seen(torch.ones(2, dtype=torch.bfloat16)) == (torch.float32, False)


def test_the_trainer_runs_on_the_device_it_is_given_without_autocast_on_the_cpu(
    phantom_images, tiny_fcl_config, monkeypatch
):
    datalist = phantom_images(1)["site-1"]
    seen = []
    step = FCLTrainer.training_step

    def spy(self, batch):
        terms = step(self, batch)
        seen.append((torch.is_autocast_enabled("cpu"), terms["loss"].dtype, terms["loss"].device.type))
        return terms

    monkeypatch.setattr(FCLTrainer, "training_step", spy)
    config = {**tiny_fcl_config, "amp": "bf16"}
    trainer = FCLTrainer(config, datalist, "site-1", "cpu")
    assert trainer.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    update = trainer.local_round(get_method("fcl").trainer.initial_message(config), 0)
    assert seen and all(s == (False, torch.float32, "cpu") for s in seen)
    assert update.num_samples > 0 and update.metrics["steps"] == len(seen)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="site-2: device cuda"):
            FCLTrainer({**config, "device": "cuda"}, datalist, "site-2", "cpu")
    with pytest.raises(ValueError, match="amp must be one of"):
        FCLTrainer({**config, "amp": "int8"}, datalist, "site-1", "cpu")


def test_throughput_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "throughput.json"
    args = ["--tiny", "--device", "cpu", "--rounds", "1", "--methods", "fcl", "--out", str(out)]
    result = throughput.main(args)
    assert json.loads(out.read_text())["device"] == "cpu"
    for section in ("pretraining", "finetuning"):
        (timing,) = result[section].values()
        assert timing["samples_per_s"] > 0 and timing["samples_per_round"] > 0
    data = result["finetuning"]["supervised"]
    assert data["steps_per_round"] >= 1 and 0 < data["data_seconds_per_step"] < data["seconds_per_step"]
    assert result["amp"]["pretraining"] == "off (CPU)" and result["gpu"] == "none: CPU run"
    assert result["scoring"]["volumes"] == 2 and result["scoring"]["seconds_per_volume"] > 0
