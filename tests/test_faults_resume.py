"""Resume: a run stopped after round 2 and resumed from its saved state ends with the weights of
a run that was never stopped (same seed, CPU), for a method with banks and a momentum encoder."""

import numpy as np
import pytest

from fedcontrast.methods.checkpoint import SERVER_STATE_FILE, load_server_state, site_state_path
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.presets import network_preset

TINY = {
    "bundle": network_preset("tiny", roi_size=[32, 32]),
    "batch_size": 2,
    "head_hidden": 16,
    "features_per_partition": 2,
    "local_samples": 2,
    "remote_samples": 2,
}


def test_stop_after_round_2_and_resume_gives_the_uninterrupted_weights(phantom_images, tmp_path):
    datalists = phantom_images(1)
    whole = run_in_process("fcl", TINY, datalists, rounds=3)
    state = tmp_path / "state"
    run_in_process("fcl", TINY, datalists, rounds=2, state_dir=state)  # "killed" after round 2
    assert load_server_state(state / SERVER_STATE_FILE, "fcl")["next_round"] == 2
    assert site_state_path(state / "site-1", 2).is_file()
    resumed = run_in_process("fcl", TINY, datalists, rounds=3, state_dir=state, resume=True)
    assert [h["round"] for h in resumed.history] == [2, 2]
    assert resumed.global_message.keys() == whole.global_message.keys()
    for key, value in whole.global_message.items():
        np.testing.assert_array_equal(resumed.global_message[key], value, err_msg=key)
    with pytest.raises(ValueError, match="a state of 'fcl', not of 'fedsimclr'"):
        run_in_process("fedsimclr", TINY, datalists, rounds=3, state_dir=state, resume=True)
