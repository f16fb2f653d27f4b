import pytest
import torch

from workbench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)
    return model, opt, sched


def step(model, opt, sched):
    x = torch.randn(16, 4)  # draws from the global RNG, which the checkpoint restores
    loss = model(torch.nn.functional.dropout(x, 0.3)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def test_round_trip_makes_the_resumed_step_bit_identical(tmp_path):
    model, opt, sched = make()
    for _ in range(3):
        step(model, opt, sched)
    path = tmp_path / "run_image_FINAL.pth"
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, metadata={"config": {"lr": 0.01}},
                    epoch=3, train_loss=0.5, val_metrics={"rank1": 50.0}, tag="FINAL")
    expected_loss = step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt, fresh_sched = make()
    for p in fresh.parameters():
        p.requires_grad_(True)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state["epoch"] == 3 and state["val_metrics"] == {"rank1": 50.0}
    assert not fresh[0].bias.requires_grad  # trainable flags restored
    assert fresh_sched.last_epoch == 3
    assert torch.equal(step(fresh, fresh_opt, fresh_sched), expected_loss)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k])


def test_prompt_file_atomicity_and_strictness(tmp_path):
    model, opt, sched = make()
    prompt = torch.nn.Linear(2, 2)
    path = tmp_path / "x_image_BEST.pth"
    written = save_checkpoint(path, model=model, optimizer=opt, prompt_learner=prompt)
    assert [p.name for p in written] == ["x_image_BEST.pth", "x_image_BEST_prompt.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_image_BEST.pth", "x_image_BEST_prompt.pth"]
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="missing|unexpected"):
        load_checkpoint(path, model=other)
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint .*: not a PyTorch file$"):
        load_checkpoint(tmp_path / "junk.pth", model=model)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pth", model=model)


def test_weights_only_rejects_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": Evil()}, path)
    model, _, _ = make()
    with pytest.raises(CheckpointError, match=r"it holds pickled code \(print\), which workbench never runs"):
        load_checkpoint(path, model=model)


def test_a_signal_during_a_save_waits_until_the_file_is_whole(tmp_path):
    """Ctrl-C (or SIGTERM) inside torch.save's writer would leave its archive unclosable: the
    signal is held until the file is complete and in place, then raised."""
    import os
    import signal

    from workbench.checkpoint import atomic_write

    def write(f):
        f.write(b"a" * 1000)
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"b" * 1000)

    outside = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "x.bin", write)
        assert (tmp_path / "x.bin").read_bytes() == b"a" * 1000 + b"b" * 1000
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    finally:
        signal.signal(signal.SIGINT, outside)
