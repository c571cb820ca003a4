"""Model-zoo checks: metadata schema, network input/output, TorchScript export, shipped weights."""

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata

from fedcontrast.nets.bundle import build_network, default_bundle_dir

BUNDLE = default_bundle_dir()
META = str(BUNDLE / "configs" / "metadata.json")
INFERENCE = str(BUNDLE / "configs" / "inference.json")
#: The schema vendored for offline checks (verify_metadata downloads only when the file is missing).
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"


@pytest.mark.skipif(not SCHEMA.is_file(), reason=f"no vendored schema at {SCHEMA} (offline check)")
def test_metadata_validates_against_the_vendored_schema():
    verify_metadata(meta_file=META, filepath=str(SCHEMA))


def test_network_input_and_output_match_the_metadata():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=INFERENCE, device="cpu")


def test_ckpt_export_writes_torchscript(tmp_path):
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(BUNDLE / "models" / "model.pt"),
        meta_file=META,
        config_file=INFERENCE,
        use_trace=True,
        input_shape=[1, 1, 160, 160, 8],
    )
    net, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    assert meta["version"] == json.loads(Path(META).read_text())["version"]
    assert net(torch.zeros(1, 1, 160, 160, 10)).shape == (1, 4, 160, 160, 10)


def test_shipped_weights_are_small_and_fit_the_default_network():
    model = BUNDLE / "models" / "model.pt"
    assert model.stat().st_size < 10 * 2**20
    build_network().load_state_dict(torch.load(model, map_location="cpu", weights_only=True))
