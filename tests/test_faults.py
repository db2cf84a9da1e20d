"""Faults never lose a run: divergence stops before a save, a signal saves and resumes exactly, a
corrupt checkpoint falls back, a used or locked out_dir is refused, a resume with a changed config
names the keys, and bad inputs are one-line refusals with exit status 2.

Reuses test_train's tiny student and JSONL records; the in-process runs share one compiled step
(`StepSpy`), so the whole file costs a few compiles.
"""

import dataclasses
import json
import logging
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import TINY, StepSpy, _cfg, _jsonl_cfg, _save_student

from ctxjax import hf, losses, train
from ctxjax.base import tokenizer_corpus
from ctxjax.checkpoint import MANIFEST, Checkpointer, CheckpointError, verify
from ctxjax.config import OptimConfig, TrainConfig
from ctxjax.host_memory import allocator_library
from ctxjax.model import Numerics
from ctxjax.run_dir import LOCK_FILE, Lock, RunRefused
from ctxjax.tasks import get_task
from ctxjax.vocab import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_bitwise(want, got):
    for i, (a, b) in enumerate(zip(_leaves(want), _leaves(got), strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"leaf {i}")


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _steps_logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _largest_file(step_dir):
    """The biggest file of a checkpoint step (the parameters), as listed in its manifest."""
    with open(step_dir / MANIFEST) as f:
        return max(json.load(f), key=lambda name: os.path.getsize(step_dir / name))


def _read(path):
    with open(path) as f:
        return f.read()


class SignalSpy(StepSpy):
    """Sends `signum` to this process while step `at` runs: the loop finishes it, then stops."""

    def __init__(self, step_fn, compiled, at, signum=signal.SIGTERM):
        super().__init__(step_fn, compiled)
        self.at, self.signum = at, signum

    def __call__(self, state, teacher_params, batch, rng):
        if len(self.prompt_ids) == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__call__(state, teacher_params, batch, rng)


@pytest.fixture(scope="module")
def straight(folders, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4) and its compiled step."""
    run = train.setup(_jsonl_cfg(folders, tmp_path_factory.mktemp("straight") / "run"), False)
    run.step_fn = spy = StepSpy(run.step_fn)
    train.train(run, progress=False)
    return run, spy.compiled


def test_signal_saves_and_resume_is_bitwise_equal(folders, straight, tmp_path, caplog):
    reference, compiled = straight
    cfg = _jsonl_cfg(folders, tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    # A restart wrapper always passes --resume: with no checkpoint yet it starts from step 0.
    first = train.setup(cfg, progress=False)
    first.step_fn = SignalSpy(first.step_fn, compiled, at=0)
    with caplog.at_level("INFO", logger="ctxjax"):
        summary = train.train(first, resume=True, progress=False)
    assert "no checkpoint in" in caplog.text and "starting from step 0" in caplog.text
    # SIGTERM during step 1: the step finished, a checkpoint at step 1, no final/, lock gone.
    assert summary["interrupted"] == {"signal": "SIGTERM", "step": 1}
    assert not os.path.exists(tmp_path / "run" / "final")
    assert not os.path.exists(tmp_path / "run" / LOCK_FILE)
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).manager.all_steps() == [1]
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored

    second = train.setup(cfg, progress=False)
    second.step_fn = StepSpy(second.step_fn, compiled)
    with caplog.at_level("INFO", logger="ctxjax"):
        train.train(second, resume=True, progress=False)
    assert "resumed from step 1" in caplog.text
    _assert_bitwise(reference.state, second.state)
    assert _steps_logged(tmp_path / "run") == [1, 2, 3, 4]  # no duplicate rows

    # Flipped bytes in the newest checkpoint: resume names it, falls back to step 2, sets step 4
    # aside and ends bitwise equal again.
    ckpt_dir = tmp_path / "run" / "checkpoints"
    victim = _largest_file(ckpt_dir / "4")
    with open(ckpt_dir / "4" / victim, "r+b") as f:
        f.seek(os.path.getsize(ckpt_dir / "4" / victim) // 2)
        data = f.read(8)
        f.seek(-len(data), 1)
        f.write(bytes(b ^ 0xFF for b in data))
    # Asked for explicitly, the corrupt step is a one-line error naming the file.
    third = train.setup(cfg, progress=False)
    with pytest.raises(CheckpointError, match=rf"checksum mismatch in .*4/{victim}") as e:
        train.train(third, resume_step=4, progress=False)
    assert "\n" not in str(e.value)
    third.step_fn = StepSpy(third.step_fn, compiled)
    with caplog.at_level("INFO", logger="ctxjax"):
        train.train(third, resume=True, progress=False)
    assert f"checkpoints/4 is unusable (checksum mismatch in {ckpt_dir}/4/{victim}" in caplog.text
    assert "resumed from step 2" in caplog.text
    assert os.path.isdir(tmp_path / "run" / "checkpoints.set_aside" / "resume-1-from-step-2" / "4")
    _assert_bitwise(reference.state, third.state)
    assert _steps_logged(tmp_path / "run") == [1, 2, 3, 4]

    # An emptied file: one line naming it, and no intact step left when every one is damaged.
    for step in Checkpointer(str(ckpt_dir)).manager.all_steps():
        (ckpt_dir / str(step) / _largest_file(ckpt_dir / str(step))).write_bytes(b"")
    fourth = train.setup(cfg, progress=False)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*checksum mismatch") as e:
        train.train(fourth, resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_divergence_stops_before_saving_and_keeps_the_good_checkpoint(folders, tmp_path):
    # Warmup from lr 0: step 1 does not move the parameters, step 2 moves them by ~5e29 (huge but
    # finite), step 3's gradients and parameters go NaN.
    out = tmp_path / "run"
    cfg = dataclasses.replace(
        _jsonl_cfg(folders, out),
        optim=OptimConfig(learning_rate=1e30, warmup_steps=2),
        train=TrainConfig(
            steps=6, checkpoint_every=1, keep_checkpoints=1, log_every=1, out_dir=str(out)
        ),
    )
    run = train.setup(cfg, progress=False)
    run.step_fn = StepSpy(run.step_fn)
    with pytest.raises(train.Diverged, match=r"step 3: non-finite the gradients, the param") as e:
        train.train(run, progress=False)
    assert "checkpoints/2; continue from it with a lower learning rate" in str(e.value)
    assert "--resume --allow-config-change optim.learning_rate=" in str(e.value)
    assert not os.path.exists(out / "final") and not os.path.exists(out / LOCK_FILE)
    # keep_checkpoints=1: the last finite step was not rotated out for the NaN one; it is intact
    # (its manifest verifies) and finite.
    ckpt = Checkpointer(str(out / "checkpoints"))
    assert ckpt.manager.all_steps() == [2]
    fresh = train.setup(cfg, progress=False)
    state, step = ckpt.restore(_abstract(fresh.state), fresh.data_iter, train.run_record(fresh))
    assert step == 2 and all(np.isfinite(x).all() for x in _leaves(state.params))
    # The diverged step is logged with its flags, NaN as NaN.
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["nonfinite_params"] for r in rows] == [0.0, 0.0, 1.0]
    assert np.isnan(rows[2]["grad_norm"])


def test_a_nan_student_gives_a_nan_loss_not_zero():
    """The logged loss read 0.0 once the parameters were NaN: `p > 0` is False for NaN, so the
    KL's support mask dropped every term."""
    student = jnp.full((1, 2, 8), jnp.nan)
    teacher = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 8)), jnp.float32)
    assert np.isnan(np.asarray(losses.reverse_kl(student, teacher))).all()
    assert np.isnan(np.asarray(losses.reverse_kl_topk(student, teacher, k=4))).all()


def test_a_used_or_locked_out_dir_is_refused(folders, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _jsonl_cfg(folders, out)
    os.makedirs(out)
    (out / "config.json").write_text('{"old": "run"}')
    with pytest.raises(RunRefused, match=r"already holds a run \(config\.json\): pass --resume"):
        train.run(cfg, progress=False)
    with pytest.raises(RunRefused, match=r"--resume and --overwrite exclude each other"):
        train.run(cfg, resume=True, overwrite=True, progress=False)

    # A live lock (another process holding it) refuses, even --overwrite, and touches nothing.
    (out / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    with pytest.raises(RunRefused, match=rf"in use by PID {os.getppid()}"):
        train.run(cfg, overwrite=True, progress=False)
    assert (out / "config.json").read_text() == '{"old": "run"}'
    # A stale lock from a dead process is reported with how to clear it, not taken.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    with pytest.raises(
        RunRefused, match=rf"stale lock .*PID {dead.pid} .*is dead.*--resume.*delete the lock"
    ):
        Lock(str(out)).acquire()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == dead.pid  # untouched
    # --resume takes a dead process's lock over (a restart wrapper after a crash), saying so.
    with caplog.at_level(logging.WARNING, logger="ctxjax"):
        lock = Lock(str(out), take_stale=True)
        lock.acquire()
    assert f"took over the stale lock {out / LOCK_FILE} of PID {dead.pid}" in caplog.text
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_synchronous_checkpoints_give_the_same_run(folders, straight, tmp_path, monkeypatch):
    """`train.async_checkpoint=false` (each save done before the next step: no second copy of the
    state while it writes): the checkpointer is made synchronous, every save is on disk when
    `save` returns, and the run is bitwise the asynchronous one, checkpoints included."""
    reference, compiled = straight
    saved_at_return = []
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        saved_at_return.append(os.path.isdir(self.step_dir(step)))  # not in a temporary folder

    monkeypatch.setattr(Checkpointer, "save", save)
    cfg = _jsonl_cfg(folders, tmp_path / "run")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, async_checkpoint=False))
    run = train.setup(cfg, progress=False)
    run.step_fn = StepSpy(run.step_fn, compiled)
    train.train(run, progress=False)
    assert saved_at_return == [True, True]
    _assert_bitwise(reference.state, run.state)
    ours = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    theirs = Checkpointer(os.path.join(reference.cfg.train.out_dir, "checkpoints"))
    assert ours.manager.all_steps() == theirs.manager.all_steps() == [2, 4]
    _assert_bitwise(
        _saved_arrays(theirs.step_dir(4) + "/state"), _saved_arrays(ours.step_dir(4) + "/state")
    )


class _Iterator:
    def __init__(self):
        self.state = {"position": 3}

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def test_checkpoints_are_written_uncompressed_and_restore_bitwise(tmp_path):
    """The state is saved without zstd (which held host buffers about the state's size while it
    wrote): a state of random fp32 numbers, which zstd shrinks by a few percent, takes at least its
    own bytes on disk, and restores bitwise."""
    state = {"w": jax.random.normal(jax.random.key(0), (256, 1024)), "step": jnp.int32(7)}
    ck = Checkpointer(str(tmp_path / "ck"), keep=1, async_save=False)
    ck.save(1, state, _Iterator(), {"model": {}})
    ck.wait()
    step_dir = ck.step_dir(1)
    on_disk = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(step_dir) for f in files
    )
    assert on_disk >= state["w"].nbytes
    restored, step = ck.restore(_abstract(state), _Iterator(), {"model": {}})
    assert step == 1
    _assert_bitwise(state, restored)


def test_a_checkpoint_of_another_model_or_layer_layout_is_refused_by_name(tmp_path):
    """Restoring into another architecture, or with the layers laid out the other way
    (`numerics.scan_layers`), is one error naming the checkpoint and what differs, not every intact
    step reported unreadable; the checkpoint stays and restores with the settings it was saved
    with."""
    state = {"w": jax.random.normal(jax.random.key(0), (4, 8)), "step": jnp.int32(3)}
    ck = Checkpointer(str(tmp_path / "ck"), keep=1, async_save=False)
    saved = {"model": {"hidden_size": 64}, "numerics": {"scan_layers": True}}
    ck.save(1, state, _Iterator(), saved)
    ck.wait()
    where = ck.step_dir(1)
    other_model = {"model": {"hidden_size": 32}, "numerics": {"scan_layers": True}}
    want = f"checkpoint {where} was written for another model (model.hidden_size: checkpoint 64 "
    with pytest.raises(ValueError, match=re.escape(want + "vs this run 32)")):
        ck.restore(_abstract(state), _Iterator(), other_model)
    unrolled = {"model": {"hidden_size": 64}, "numerics": {"scan_layers": False}}
    want = (
        f"checkpoint {where} holds the layers stacked (numerics.scan_layers=true), this run has "
        "numerics.scan_layers=false: resume with numerics.scan_layers=true"
    )
    with pytest.raises(ValueError, match=re.escape(want)):
        ck.restore(_abstract(state), _Iterator(), unrolled)
    restored, step = ck.restore(_abstract(state), _Iterator(), saved)
    assert step == 1
    _assert_bitwise(state, restored)


def test_resume_with_a_changed_config(folders, straight, tmp_path):
    reference, _ = straight
    out = reference.cfg.train.out_dir
    before = _read(os.path.join(out, "config.json"))
    changed = dataclasses.replace(
        reference.cfg,
        optim=OptimConfig(learning_rate=5e-4, warmup_steps=1),
        train=reference.cfg.train,
    )
    run = train.setup(changed, progress=False)
    with pytest.raises(RunRefused, match=r"optim\.learning_rate: 0\.001 -> 0\.0005") as e:
        train.train(run, resume=True, progress=False)
    assert "--allow-config-change" in str(e.value) and "optim.warmup_steps" not in str(e.value)
    assert _read(os.path.join(out, "config.json")) == before
    # Accepted: recorded in the history, config.json keeps the original (the run is at its end:
    # no step runs, only final/ is written again).
    more_logging = dataclasses.replace(changed.train, log_every=2)
    run = train.setup(dataclasses.replace(changed, train=more_logging), progress=False)
    train.train(run, resume=True, allow_config_change=True, progress=False)
    assert _read(os.path.join(out, "config.json")) == before
    with open(os.path.join(out, "config_history.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    assert row["step"] == 4
    assert row["changes"] == {"optim.learning_rate": [1e-3, 5e-4], "train.log_every": [1, 2]}
    # Accepting a change of the layers' layout still cannot restore the unrolled checkpoint into
    # stacked layers: one line naming it, nothing written, the checkpoints kept.
    steps_before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    scanned = dataclasses.replace(changed, numerics=Numerics(scan_layers=True))
    run = train.setup(scanned, progress=False)
    with pytest.raises(ValueError, match=r"holds the layers one by one \(numerics\.scan_layers=fa"):
        train.train(run, resume=True, allow_config_change=True, progress=False)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == steps_before
    with open(os.path.join(out, "config_history.jsonl")) as f:
        assert len(f.readlines()) == 1  # the refused resume recorded no change
    assert _read(os.path.join(out, "config.json")) == before


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def bad_inputs(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    task = get_task("synthetic", families=["seq"], max_len=4)
    other_tok = build_tokenizer(tokenizer_corpus(task, task.sft_records(50, 1)), vocab_size=300)
    small_vocab = dataclasses.replace(TINY, vocab_size=64)
    same_tok = hf.load_tokenizer(folders["student"])
    record = json.dumps({"prompt": "max 1 2", "context": "rule: x"}).encode() + b"\n"
    return dict(
        other_tokenizer=_save_student(root / "other_tok", TINY, other_tok),
        small_vocab=_save_student(root / "small_vocab", small_vocab, same_tok),
        no_context=_write(root / "plain.jsonl", b'{"prompt": "max 1 2"}\n' * 8),
        not_utf8=_write(root / "latin1.jsonl", record + b'{"prompt": "caf\xe9"}\n'),
        empty=_write(root / "empty.jsonl", b"\n"),
        a_file=str(root / "plain.jsonl"),
    )


def test_refused_inputs_exit_2_with_one_line(folders, bad_inputs, tmp_path, capsys):
    main = runpy.run_path(os.path.join(REPO, "scripts", "train.py"))["main"]
    common = [
        f"student={folders['student']}",
        "task.name=jsonl",
        "data.batch_size=8",
        "data.max_prompt_tokens=24",
        "data.max_context_prompt_tokens=40",
    ]
    data = f"data.train_file={folders['jsonl']}"
    cases = [
        ([data, f"teacher={bad_inputs['other_tokenizer']}"], r"teacher .*: tokenizers differ"),
        ([data, f"student={bad_inputs['small_vocab']}"], r"the tokenizer has \d+ tokens but"),
        (
            [f"data.train_file={bad_inputs['no_context']}"],
            r"plain\.jsonl:1: no 'context' and no run-level context .*nothing to distill",
        ),
        ([f"data.train_file={bad_inputs['not_utf8']}"], r"latin1\.jsonl:2: not UTF-8"),
        ([f"data.train_file={bad_inputs['empty']}"], r"data file holds no records: .*empty"),
        ([data, "mesh.fsdp=0"], r"mesh\.fsdp must be >= 1 or -1"),
        ([data, "mesh.tensor=-2"], r"mesh\.tensor must be >= 1 or -1"),
        ([data, "loss.beta=nan"], r"loss\.beta must be a finite number, got nan"),
        ([data, "optim.learning_rate=inf"], r"optim\.learning_rate must be a finite number"),
        ([data, f"student={bad_inputs['a_file']}"], r"path is a file, not a folder: .*plain"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = f"train.out_dir={tmp_path / str(i)}"
        with pytest.raises(SystemExit) as e:
            main(["--no-progress", *common, *overrides, out])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (overrides, err)
        assert len(err) == 1 and re.search(message, err[0]), (overrides, err)
        # A refused run leaves no run behind.
        assert not os.path.exists(tmp_path / str(i) / "config.json")


def test_eval_script_on_a_half_written_model_folder(folders, tmp_path, capsys):
    model = tmp_path / "half"
    model.mkdir()
    for name in os.listdir(folders["student"]):
        if os.path.isfile(os.path.join(folders["student"], name)):
            shutil.copy(os.path.join(folders["student"], name), model / name)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    main = runpy.run_path(os.path.join(REPO, "scripts", "eval.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model), "--task", "synthetic", "--context", "careful",
              "--out", str(tmp_path / "eval"), "--examples", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "model.safetensors" in err[0], err


def test_second_sigint_stops_at_once():
    with train.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_overwrite_replaces_the_old_run_once_set_up(folders, straight, tmp_path):
    _, compiled = straight
    out = tmp_path / "run"
    os.makedirs(out / "final")
    (out / "config.json").write_text('{"old": "run"}')
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    run = train.setup(_jsonl_cfg(folders, out), progress=False)
    run.step_fn = StepSpy(run.step_fn, compiled)
    train.train(run, overwrite=True, progress=False)
    assert json.loads(_read(out / "config.json")) == train.run_record(run)
    assert _steps_logged(out) == [1, 2, 3, 4]
    assert os.path.exists(out / "final" / "config.json")


def test_sigterm_to_the_train_script_saves_and_exits_0(folders, tmp_path):
    """A real process and signal; checkpoints off (train.checkpoint_every=0): the stop saves one."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes"
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        "--no-progress",
        f"student={folders['student']}",
        "task.name=jsonl",
        f"data.train_file={folders['jsonl']}",
        "data.batch_size=8",
        "data.max_prompt_tokens=24",
        "data.max_context_prompt_tokens=40",
        "rollout.max_new_tokens=6",
        "train.steps=10000",
        "train.checkpoint_every=0",
        f"train.out_dir={out}",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not _read(out / "metrics.jsonl"):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    (step,) = Checkpointer(str(out / "checkpoints")).manager.all_steps()
    assert f"SIGTERM: stopped after step {step}" in stdout and "--resume" in stdout
    assert step >= 2 and _steps_logged(out)[-1] == step
    assert not (out / "final").exists() and not (out / LOCK_FILE).exists()
    # The entry point re-executed under the caching allocator where it is installed (the run's
    # memory depends on it), and the summary says so.
    if not {"LD_PRELOAD", "CTXJAX_ALLOCATOR"} & env.keys():
        expected = "mimalloc" if allocator_library() else "system"
        assert json.loads(_read(out / "summary.json"))["host_allocator"] == expected
        assert "host allocator: mimalloc" in stderr or expected == "system", stderr[-2000:]

    # The lock a kill -9 leaves behind (written here for the now dead PID): a run that is not a
    # --resume names it as stale and exits 2 before any set-up.
    (out / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": proc.pid}))
    again = subprocess.run([*cmd, "--overwrite"], env=env, capture_output=True, text=True)
    assert again.returncode == 2, again.stderr[-2000:]
    line = again.stderr.strip().splitlines()[-1]
    assert f"stale lock {out / LOCK_FILE}: PID {proc.pid}" in line and "--resume" in line


def _script_cmd(paths, out, steps):
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        "--no-progress",
        f"student={paths['student']}",
        "task.name=jsonl",
        f"data.train_file={paths['jsonl']}",
        "data.batch_size=8",
        "data.max_prompt_tokens=24",
        "data.max_context_prompt_tokens=40",
        "rollout.max_new_tokens=6",
        f"train.steps={steps}",
        "train.checkpoint_every=1",
        f"train.out_dir={out}",
    ]


def _saved_arrays(state_dir):
    """The arrays of a checkpoint's train state, read back as saved (no template needed)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(str(state_dir))
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return checkpointer.restore(str(state_dir), abstract)


def _kill_9_when(cmd, env, ready, what):
    """Starts `cmd`, SIGKILLs it as soon as `ready()` holds; returns what the moment was."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while not ready():
            assert proc.poll() is None, f"finished before {what}: {proc.communicate()[1][-2000:]}"
            assert time.time() < deadline, f"{what} never came"
            time.sleep(0.01)
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return what


def test_kill_9_inside_a_save_and_mid_run_then_resume_is_bitwise_equal(folders, tmp_path):
    """kill -9 while Orbax writes a checkpoint (its temporary folder exists), resume, kill -9 again
    between steps, resume to the end: the final model and the last checkpoint equal an
    uninterrupted run's bit for bit. Each --resume takes over the dead process's lock."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes"
    steps = 6
    ref, out = tmp_path / "ref", tmp_path / "killed"
    done = subprocess.run(_script_cmd(folders, ref, steps), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpts = out / "checkpoints"

    def saving():  # an Orbax save in flight: its temporary step folder
        return ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())

    def past_step_3():
        return (out / "metrics.jsonl").exists() and len(_read(out / "metrics.jsonl").split()) >= 3

    _kill_9_when(_script_cmd(folders, out, steps), env, saving, "a save in flight")
    assert (out / LOCK_FILE).exists()  # what a crash leaves
    _kill_9_when([*_script_cmd(folders, out, steps), "--resume"], env, past_step_3, "step 3")
    done = subprocess.run(
        [*_script_cmd(folders, out, steps), "--resume"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "took over the stale lock" in done.stderr
    final = "final/model.safetensors"
    assert (out / final).read_bytes() == (ref / final).read_bytes()
    last = f"checkpoints/{steps}/state"
    _assert_bitwise(_saved_arrays(ref / last), _saved_arrays(out / last))
    assert _steps_logged(out) == list(range(1, steps + 1))  # no duplicate rows after resumes


def test_a_resumed_run_keeps_the_before_section(folders, tmp_path, monkeypatch, caplog):
    """The starting student's evaluation is not redone on the trained parameters after a restore:
    it comes from summary.json. (Resumed at its last step: no step runs, nothing compiles.)"""
    out = tmp_path / "run"
    cfg = _cfg(folders, out, train=TrainConfig(steps=2, checkpoint_every=2, out_dir=str(out)))
    run = train.setup(cfg, progress=False)
    ckpt = Checkpointer(str(out / "checkpoints"), async_save=False)
    ckpt.save(2, run.state, run.data_iter, train.run_record(run))
    ckpt.wait()
    (out / "config.json").write_text(json.dumps(train.run_record(run)))
    (out / "summary.json").write_text(json.dumps({"before": {"acc_x": 0.25}}))

    def must_not_run(run):
        raise AssertionError("evaluate_start ran again on a resume")

    monkeypatch.setattr(train, "evaluate_start", must_not_run)
    monkeypatch.setattr(train, "evaluate_student", lambda run, **kw: {"acc_x": 0.75})
    with caplog.at_level("INFO", logger="ctxjax"):
        train.train(run, resume=True, progress=False)
    assert "resumed from step 2" in caplog.text
    saved = json.loads(_read(out / "summary.json"))
    assert saved["before"] == {"acc_x": 0.25} and saved["after"] == {"acc_x": 0.75}


def test_resume_config_written_by_another_version(tmp_path):
    """A saved record that lacks a newer key compares it with the default (a non-default value is
    a change); a key the current record no longer holds is not compared."""
    from ctxjax.config import RunConfig, to_dict
    from ctxjax.run_dir import check_resume_config

    defaults = to_dict(RunConfig())
    saved = to_dict(RunConfig())
    del saved["numerics"]["scan_layers"]  # written before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    current = to_dict(RunConfig())
    del current["base"]  # a record that no longer holds base.* (student= runs)
    assert check_resume_config(str(tmp_path), current, allow_change=False, defaults=defaults) == {}
    current["numerics"]["scan_layers"] = True
    with pytest.raises(RunRefused, match=r"numerics\.scan_layers: False -> True"):
        check_resume_config(str(tmp_path), current, allow_change=False, defaults=defaults)


def _copy_run(reference, tmp_path):
    """A copy of the finished 4-step run (checkpoints 2 and 4, sealed), moved to `tmp_path/run`."""
    out = tmp_path / "run"
    shutil.copytree(reference.cfg.train.out_dir, out)
    cfg = dataclasses.replace(
        reference.cfg, train=dataclasses.replace(reference.cfg.train, out_dir=str(out))
    )
    return out, cfg


def _flip(path, n=42):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(n)
        f.seek(-len(data), 1)
        f.write(bytes(b ^ 0xFF for b in data))


def test_an_unsealed_checkpoint_is_restored_only_when_asked(folders, straight, tmp_path, caplog):
    """The newest step lost its manifest and had bytes flipped: a resume never restores it
    unverified; it falls back to the sealed step 2, keeps step 4 aside and ends bitwise equal."""
    reference, compiled = straight
    out, cfg = _copy_run(reference, tmp_path)
    step4 = out / "checkpoints" / "4"
    victim = _largest_file(step4)
    os.remove(step4 / MANIFEST)
    _flip(step4 / victim)
    run = train.setup(cfg, progress=False)
    with pytest.raises(CheckpointError, match=r"--resume-step 4 --unverified") as e:
        train.train(run, resume_step=4, progress=False)
    assert "no checksum manifest" in str(e.value) and "\n" not in str(e.value)
    run.step_fn = StepSpy(run.step_fn, compiled)
    with caplog.at_level("INFO", logger="ctxjax"):
        train.train(run, resume=True, progress=False)
    assert "checkpoints/4 is unusable (no checksum manifest" in caplog.text
    assert "resumed from step 2" in caplog.text and "unverified, as asked" not in caplog.text
    _assert_bitwise(reference.state, run.state)
    aside = out / "checkpoints.set_aside" / "resume-1-from-step-2"
    assert (aside / "4" / victim).exists()  # kept, not deleted
    assert json.loads((aside / "metrics.jsonl").read_text().splitlines()[0])["step"] == 3
    assert _steps_logged(out) == [1, 2, 3, 4]
    # The new step 4 was sealed; with its manifest gone again, only --unverified restores it.
    assert verify(str(step4)) is None
    os.remove(step4 / MANIFEST)
    again = train.setup(cfg, progress=False)
    with caplog.at_level("INFO", logger="ctxjax"):
        train.train(again, resume_step=4, unverified=True, progress=False)
    assert "restoring it unverified, as asked" in caplog.text
    _assert_bitwise(reference.state, again.state)
    with pytest.raises(RunRefused, match=r"--unverified restores one chosen step"):
        train.run(cfg, resume=True, unverified=True, progress=False)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_save_is_sealed_before_the_run_goes_on(folders, straight, tmp_path, async_save):
    """Synchronous: before the next step; asynchronous: once the next step is dispatched."""
    _, compiled = straight
    out = tmp_path / "run"
    cfg = _jsonl_cfg(folders, out)
    train_cfg = dataclasses.replace(cfg.train, async_checkpoint=async_save)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    seen = {}

    class SealSpy(StepSpy):
        def __call__(self, state, teacher_params, batch, rng):
            if len(self.prompt_ids) in (2, 3):  # steps 3 and 4 start; step 2 was saved
                seen[len(self.prompt_ids) + 1] = verify(str(out / "checkpoints" / "2"))
            return super().__call__(state, teacher_params, batch, rng)

    run = train.setup(cfg, progress=False)
    run.step_fn = SealSpy(run.step_fn, compiled)
    train.train(run, progress=False)
    assert seen[4] is None
    if not async_save:
        assert seen[3] is None


def test_two_resume_steps_in_a_row_keep_both_set_aside_copies(folders, straight, tmp_path):
    reference, compiled = straight
    out, cfg = _copy_run(reference, tmp_path)
    original_4 = _saved_arrays(out / "checkpoints" / "4" / "state")
    original_rows = _read(out / "metrics.jsonl").splitlines()
    for _ in range(2):
        run = train.setup(cfg, progress=False)
        run.step_fn = StepSpy(run.step_fn, compiled)
        train.train(run, resume_step=2, progress=False)
        _assert_bitwise(reference.state, run.state)
        assert _steps_logged(out) == [1, 2, 3, 4]
    for n in (1, 2):
        aside = out / "checkpoints.set_aside" / f"resume-{n}-from-step-2"
        assert verify(str(aside / "4")) is None  # intact, manifest and all
        rows = [json.loads(line) for line in _read(aside / "metrics.jsonl").splitlines()]
        assert [(r["step"], r["loss"]) for r in rows] == [
            (r["step"], r["loss"]) for r in map(json.loads, original_rows[2:])
        ]
    # The original run's rows themselves (their timings too) are the first resume's.
    first_rows = out / "checkpoints.set_aside" / "resume-1-from-step-2" / "metrics.jsonl"
    assert _read(first_rows).splitlines() == original_rows[2:]
    first = out / "checkpoints.set_aside" / "resume-1-from-step-2" / "4" / "state"
    _assert_bitwise(original_4, _saved_arrays(first))


def test_a_resume_that_changes_the_teacher_or_base_is_refused_before_set_up(
    folders, straight, tmp_path, monkeypatch, capsys
):
    reference, _ = straight
    out, _ = _copy_run(reference, tmp_path)

    def no_set_up(*args, **kwargs):
        raise AssertionError("set-up ran before the refusal")

    history = out / "config_history.jsonl"
    history_before = _read(history) if history.exists() else None
    monkeypatch.setattr(train, "setup", no_set_up)
    main = runpy.run_path(os.path.join(REPO, "scripts", "train.py"))["main"]
    common = [
        "--no-progress",
        "--resume",
        "--allow-config-change",
        f"student={folders['student']}",
        "task.name=jsonl",
        f"data.train_file={folders['jsonl']}",
        "data.batch_size=8",
        "data.max_prompt_tokens=24",
        "data.max_context_prompt_tokens=40",
        "train.steps=4",
        "train.checkpoint_every=2",
        f"train.out_dir={out}",
    ]
    for change, key in [
        (f"teacher={folders['student']}", "teacher"),  # the frozen student -> a folder
        ("numerics.param_dtype=bfloat16", "numerics.param_dtype"),
        (f"student={out}", "student"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*common, change])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the config's warnings
        assert e.value.code == 2 and err.startswith("error: "), (change, err)
        assert f"{key}: " in err and "even with --allow-config-change" in err, err
    assert (_read(history) if history.exists() else None) == history_before  # nothing recorded

    # A run on a base model ctxjax built: every key of the base's cache key is frozen, and the
    # refusal comes before the base would be built.
    built = tmp_path / "built"
    base_cfg = _cfg(folders, built, student="")
    built.mkdir()
    (built / "config.json").write_text(json.dumps(train.planned_record(base_cfg)))
    monkeypatch.setattr(train, "build_or_reuse_base", no_set_up)
    for section, change in [
        ("numerics", Numerics(param_dtype="bfloat16")),
        ("model", dataclasses.replace(base_cfg.model, hidden_size=48)),
        ("base", dataclasses.replace(base_cfg.base, sft_steps=base_cfg.base.sft_steps + 1)),
    ]:
        changed = dataclasses.replace(base_cfg, **{section: change})
        with pytest.raises(RunRefused, match=rf"base model's cache key \({section}\.") as e:
            train.run(changed, resume=True, allow_config_change=True, progress=False)
        assert "\n" not in str(e.value)
    # What --allow-config-change does allow is refused without it, also before the build.
    changed = dataclasses.replace(base_cfg, optim=OptimConfig(learning_rate=5e-4, warmup_steps=1))
    with pytest.raises(RunRefused, match=r"optim\.learning_rate: 0\.001 -> 0\.0005"):
        train.run(changed, resume=True, progress=False)


def test_a_relative_student_path_is_recorded_and_compared_resolved(folders, tmp_path, monkeypatch):
    from ctxjax.config import RunConfig, to_dict
    from ctxjax.run_dir import check_resume_config

    out = tmp_path / "run"
    out.mkdir()
    absolute = _jsonl_cfg(folders, out)
    (out / "config.json").write_text(json.dumps(train.planned_record(absolute)))
    monkeypatch.chdir(os.path.dirname(folders["student"]))
    relative = dataclasses.replace(absolute, student=os.path.basename(folders["student"]))
    assert train.planned_record(relative)["student"] == folders["student"]
    defaults = to_dict(RunConfig())
    planned = train.planned_record(relative)
    assert check_resume_config(str(out), planned, allow_change=False, defaults=defaults) == {}
    run = train.setup(relative, progress=False)
    assert (
        train.run_record(run)["student"] == run.student_path == os.path.abspath(folders["student"])
    )


def test_smaller_bad_inputs_are_one_line_refusals(folders, straight, tmp_path, capsys):
    """Each: exit 2 and one line naming what is wrong, before any set-up."""
    reference, _ = straight
    main = runpy.run_path(os.path.join(REPO, "scripts", "train.py"))["main"]
    common = [
        "--no-progress",
        "task.name=jsonl",
        f"data.train_file={folders['jsonl']}",
        "data.batch_size=8",
        "data.max_prompt_tokens=24",
        "data.max_context_prompt_tokens=40",
    ]
    student = f"student={folders['student']}"
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folders["student"], no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        ([], r"task\.name=jsonl trains on your own records.*set student="),
        ([f"student={tmp_path / 'nowhere'}"], r"student folder not found: .*nowhere"),
        ([f"student={reference.cfg.train.out_dir}"], r"is a ctxjax run folder.*final"),
        ([f"student={no_tokenizer}"], r"no_tokenizer \(no tokenizer\.json\)"),
        ([student, "rollout.top_p=1.5"], r"rollout\.top_p must be null or a number in \(0, 1\]"),
        ([student, f"train.out_dir={a_file}"], r"train\.out_dir=.*a_file is a file, not a folder"),
        ([student, f"train.out_dir={a_file / 'run'}"], r"a_file is a file, not a folder"),
        (["--config", str(tmp_path)], r"config file .* is a folder, not a YAML file"),
    ]
    for i, (args, message) in enumerate(cases):
        out = (
            []
            if any(a.startswith("train.out_dir") for a in args)
            else [f"train.out_dir={tmp_path / str(i)}"]
        )
        with pytest.raises(SystemExit) as e:
            main([*common, *out, *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (args, err)
        assert len(err) == 1 and re.search(message, err[0]), (args, err)

    # eval.py on a run folder and on a folder whose config.json is not a model's.
    evaluate = runpy.run_path(os.path.join(REPO, "scripts", "eval.py"))["main"]
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"hidden_size": 8}')
    for model, message in [
        (reference.cfg.train.out_dir, r"is a ctxjax run folder, not a model: its model is .*final"),
        (str(not_a_model), r"not_a_model.*has no model_type"),
    ]:
        with pytest.raises(SystemExit) as e:
            evaluate(["--model", model, "--task", "synthetic", "--context", "careful",
                      "--out", str(tmp_path / "eval")])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and re.search(message, err[0]), err


def test_a_changed_layer_layout_on_resume_exits_2(folders, straight, tmp_path, capsys):
    reference, _ = straight
    out, _ = _copy_run(reference, tmp_path)
    main = runpy.run_path(os.path.join(REPO, "scripts", "train.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--no-progress", "--resume", "--allow-config-change", f"student={folders['student']}",
              "task.name=jsonl", f"data.train_file={folders['jsonl']}", "data.batch_size=8",
              "data.max_prompt_tokens=24", "data.max_context_prompt_tokens=40", "train.steps=4",
              "train.checkpoint_every=2", "optim.learning_rate=1e-3", "optim.warmup_steps=1",
              f"train.out_dir={out}", "numerics.scan_layers=true"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "numerics.scan_layers=false" in err, err


def test_sigterm_during_the_final_evaluation_names_it(folders, tmp_path, monkeypatch, caplog):
    """Resumed at its last step: no step runs; SIGTERM while evaluating says what it finishes."""
    out = tmp_path / "run"
    cfg = _cfg(folders, out, train=TrainConfig(steps=2, checkpoint_every=2, out_dir=str(out)))
    run = train.setup(cfg, progress=False)
    ckpt = Checkpointer(str(out / "checkpoints"), async_save=False)
    ckpt.save(2, run.state, run.data_iter, train.run_record(run))
    (out / "config.json").write_text(json.dumps(train.run_record(run)))
    (out / "summary.json").write_text(json.dumps({"before": {"acc_x": 0.25}}))

    def evaluate_and_get_a_signal(run, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        return {"acc_x": 0.5}

    monkeypatch.setattr(train, "evaluate_student", evaluate_and_get_a_signal)
    with caplog.at_level("INFO", logger="ctxjax"):
        summary = train.train(run, resume=True, progress=False)
    assert "SIGTERM: finishing the final evaluation and the export of final/" in caplog.text
    assert "finishing the current step" not in caplog.text
    assert os.path.isdir(summary["final_dir"])


def test_a_reexport_removes_the_half_written_folder_of_an_interrupted_one(tmp_path):
    final = tmp_path / "final"
    left = tmp_path / ".final.tmp-0123abcd"  # what a kill mid-export leaves
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".other.tmp-0123abcd"  # another folder's: not ours to remove
    other.mkdir()
    hf.write_folder_atomically(final, lambda d: open(os.path.join(d, "x"), "w").close())
    assert (final / "x").exists() and not left.exists() and other.exists()


def test_eval_script_with_a_verifier_that_returns_a_string_exits_2(folders, tmp_path, capsys):
    """The string 'False' is truthy: it used to pass every answer (Acc 1.000). Now one line
    naming the verifier, the record and the value."""
    main = runpy.run_path(os.path.join(REPO, "scripts", "eval.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--model", folders["student"], "--data", folders["jsonl"], "--task-option",
              "verifier=test_verifiers:answer_as_text", "--examples", "2", "--max-new-tokens",
              "2", "--no-retention", "--no-cosine", "--out", str(tmp_path / "eval")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert re.search(r"train\.jsonl:\d+: verifier 'test_verifiers:answer_as_text' returned "
                     r"'(True|False)' \(str\)", err[0]), err  # fmt: skip
