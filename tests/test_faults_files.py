"""Wrong files given as options end in one clear line naming the file: an output folder option
naming an existing file, and a ``ckpt_path`` that is not the whole network's checkpoint."""

from __future__ import annotations

import argparse
import importlib
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fedcontrast.cli import main
from fedcontrast.nets.bundle import build_network, bundle_workflow, default_bundle_dir

TINY = {"init_filters": 4, "blocks_down": [1, 1, 1], "roi_size": [32, 32], "patch_size": [16, 16, 4]}


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "synth", "--out", "{file}"],
        [
            "data",
            "split",
            "--dataset",
            ".",
            "--format",
            "acdc",
            "--out",
            "{file}",
            "--labeled-per-site=1",
            "--test-per-site=1",
        ],
        ["job", "export", "fcl", "--out", "{file}"],
        ["bench", "--out", "{file}"],
        ["deploy", "poc", "--workspace", "{file}"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_an_output_folder_option_naming_a_file_is_one_line(tmp_path, capsys, argv):
    existing = tmp_path / "notes.txt"
    existing.write_text("not a folder")
    option = next(a for a in argv if a.startswith("--") and argv[argv.index(a) + 1] == "{file}")
    assert main([a.replace("{file}", str(existing)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedcontrast {argv[0]}: error: {option} {existing}: an existing file, not a folder; "
        "name a new or existing folder"
    ]
    assert existing.read_text() == "not a folder"


def test_a_job_script_output_option_naming_a_file_is_refused(tmp_path):
    from fedcontrast.flare.jobs import run_or_export

    existing = tmp_path / "notes.txt"
    existing.write_text("x")
    args = argparse.Namespace(export=None, workspace=tmp_path / "ws", output=existing, datalist_dir=None)
    with pytest.raises(SystemExit, match=f"^error: --output {existing}: an existing file, not a folder"):
        run_or_export(None, args)


@pytest.fixture(scope="module")
def checkpoint_scripts():
    """The bundle's ``scripts.checkpoint`` module (the bundle root on ``sys.path``, as monai.bundle does)."""
    sys.path.insert(1, str(default_bundle_dir()))
    return importlib.import_module("scripts.checkpoint")


def wrong_checkpoints(folder):
    """``{what it is: path}`` of files that are not the tiny network's checkpoint."""
    from fedcontrast.nets.decoder import build_checkpoint

    network = build_network(overrides=TINY)
    encoder = network.encoder.state_dict()
    encoder_module = importlib.import_module("scripts.encoder")
    files = {
        name: folder / f"{name}.pt"
        for name in ("text", "pickled", "encoder", "bare_encoder", "decoder", "wider")
    }
    files["text"].write_text("model weights are on the shared drive\n")
    torch.save(network, files["pickled"])
    encoder_module.save_encoder(encoder, files["encoder"], {"init_filters": 4})
    torch.save(encoder, files["bare_encoder"])
    torch.save(build_checkpoint({"w": torch.zeros(1)}, 2, encoder), files["decoder"])
    torch.save(build_network(overrides={**TINY, "init_filters": 8}).state_dict(), files["wider"])
    return network, files


def test_a_checkpoint_that_is_not_the_whole_network_is_named_with_what_was_expected(
    tmp_path, checkpoint_scripts
):
    network, files = wrong_checkpoints(tmp_path)
    expected = checkpoint_scripts.EXPECTED
    why = {
        "text": "not a PyTorch checkpoint file (torch.load: ",
        "pickled": "a pickled Python object (e.g. torch.save(model)), not a state dict of tensors",
        "encoder": "a pre-trained encoder file (the encoder only, no decoder or output layer",
        "bare_encoder": "does not fit this network (the encoder's keys alone: an encoder-only state dict)",
        "decoder": "a fedcontrast.pretrained_network checkpoint holding ['encoder', 'decoder_blocks']",
        "wider": "does not fit this network: missing keys [], unexpected keys [], shape mismatches [",
    }
    for name, path in files.items():
        with pytest.raises(ValueError) as err:
            checkpoint_scripts.read_network_state(path, network)
        message = str(err.value)
        assert message.startswith(f"ckpt_path {path}: {why[name]}"), message
        assert message.endswith(expected) and "\n" not in message and "weights_only" not in message
    with pytest.raises(FileNotFoundError, match=f"ckpt_path {tmp_path / 'missing.pt'}: no such file"):
        checkpoint_scripts.read_network_state(tmp_path / "missing.pt", network)
    # the whole network loads, as a plain state dict or as MONAI's {"model": state dict}
    torch.save({"model": network.state_dict()}, tmp_path / "saved.pt")
    assert set(checkpoint_scripts.read_network_state(tmp_path / "saved.pt", network)) == set(
        network.state_dict()
    )


def test_inference_refuses_a_non_checkpoint_naming_it_and_writes_nothing(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.ones((36, 30, 6), np.float32), np.eye(4)), scans / "scan.nii.gz")
    text = tmp_path / "model.txt"
    text.write_text("model weights are on the shared drive\n")
    overrides = {**TINY, "dataset_dir": str(scans), "output_dir": str(tmp_path / "out"), "num_workers": 0}
    workflow = bundle_workflow(config="inference", overrides={**overrides, "ckpt_path": str(text)})
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:  # the config's "run" expression wraps the handler's error
        workflow.run()
    assert isinstance(err.value.__cause__, ValueError)
    assert str(err.value.__cause__).startswith(f"ckpt_path {text}: not a PyTorch checkpoint file")
    assert err.value.__cause__.__cause__ is None and err.value.__cause__.__suppress_context__
    assert not (tmp_path / "out").exists()
