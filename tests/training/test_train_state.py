"""The training loop's parts that decide correctness on a GPU, checked without one: the meta device
stands in for "a device other than the CPU" (a tensor left behind on the CPU shows up as such)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ConfigError, identity_digest, load_config, training_identity
from pipeline.training import recipe
from pipeline.training.loop import build_training_state, check_resumable, worst_score

TINY = ["model.variant=uniformer_xs", "model.num_classes=4", "train.precision=fp32", "optim.ema_decay=0.9"]


def trained_checkpoint(cfg) -> dict:
    """A checkpoint with real optimizer state: one AdamW step on the CPU."""
    state = build_training_state(cfg, torch.device("cpu"), lambda net: net)
    state.model(torch.randn(1, 3, 8, 64, 64)).sum().backward()
    state.optimizer.step()
    state.ema.update(state.net)
    return {"model_state": state.net.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(), "ema_state": state.ema.module.state_dict(),
            "ema_updates": state.ema.updates}


@pytest.mark.filterwarnings("ignore:.*to a meta parameter:UserWarning")  # meta weights hold no data: intended
def test_resumed_optimizer_and_ema_live_on_the_parameters_device():
    cfg = load_config(None, TINY)
    checkpoint = trained_checkpoint(cfg)
    meta = torch.device("meta")
    state = build_training_state(cfg, meta, lambda net: net.to(meta), checkpoint)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    assert params and all(p.device == meta for p in params)
    for p in params:
        moments = state.optimizer.state[p]
        assert moments["exp_avg"].device == meta and moments["exp_avg_sq"].device == meta
        # AdamW keeps `step` as a CPU scalar unless fused (as on CUDA) or capturable: its own policy.
        assert moments["step"].device == torch.device("cpu") and moments["step"].item() == 1
    assert all(t.device == meta for t in state.ema.module.state_dict().values())
    assert state.ema.updates == 1  # the warm-up goes on where it stopped


def test_a_fresh_state_takes_the_optimizer_from_the_placed_network():
    cfg = load_config(None, TINY)
    placed = []
    state = build_training_state(cfg, torch.device("cpu"), lambda net: placed.append(net) or net)
    assert placed == [state.net]
    ids = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert ids == {id(p) for p in state.net.parameters()}


def test_resume_refuses_a_checkpoint_of_another_training():
    cfg = load_config(None, TINY)
    before = training_identity(cfg, "hash-a")
    checkpoint = {"identity": before, "identity_digest": identity_digest(before)}
    check_resumable(checkpoint, training_identity(dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, epochs=200)), "hash-a"))  # more epochs: allowed
    with pytest.raises(ConfigError, match=r"other values of data\.manifest_hash, optim\.weight_decay; keep them"):
        check_resumable(checkpoint, training_identity(dataclasses.replace(
            cfg, optim=dataclasses.replace(cfg.optim, weight_decay=0.1)), "hash-b"))


def test_checkpoints_before_any_validation_rank_worst():
    # Ray keeps the highest score; "min" metrics are negated first.
    assert worst_score("val_top1") < 0.0 <= 1.0
    assert -worst_score("val_loss") < -1e6
    assert abs(worst_score("val_loss")) < float("inf")  # Ray's saved state cannot hold infinities


def test_ema_update_follows_the_network():
    net = torch.nn.Linear(2, 2)
    ema = recipe.ModelEMA(net, decay=0.999)
    for _ in range(3):
        ema.update(net)
    assert ema.updates == 3


def ddp_gradients(rank: int, world: int, port: int, compression: str, out: str) -> None:
    """One rank of a 2-process gloo group: one backward of the tiny model through build_training_state."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config(None, [*TINY, f"train.grad_compression={compression}"])
        state = build_training_state(cfg, torch.device("cpu"), DistributedDataParallel)
        torch.manual_seed(rank)  # each rank its own clips, as under DDP
        state.model(torch.randn(2, 3, 8, 64, 64)).square().mean().backward()
        torch.save({name: p.grad for name, p in state.net.named_parameters()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_bf16_gradient_compression_sends_gradients_as_bf16(tmp_path):
    import socket

    import torch.multiprocessing as mp

    grads = {}
    for compression in ("none", "bf16"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(ddp_gradients, args=(2, port, compression, str(tmp_path / compression)), nprocs=2)
        ranks = [torch.load(tmp_path / f"{compression}.{r}") for r in range(2)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # all-reduced: the same on both
        grads[compression] = ranks[0]
    big = [k for k, g in grads["none"].items() if g.numel() > 1000]
    # Compressed, every averaged gradient is a bf16 number; in fp32 most are not.
    assert all(torch.equal(grads["bf16"][k], grads["bf16"][k].bfloat16().float()) for k in big)
    assert not all(torch.equal(grads["none"][k], grads["none"][k].bfloat16().float()) for k in big)
    for k in big:  # ... and the same gradients to bf16's precision (2^-8, rounded three times; relative to the largest)
        torch.testing.assert_close(grads["bf16"][k], grads["none"][k], rtol=0,
                                   atol=2e-2 * grads["none"][k].abs().max().item())
