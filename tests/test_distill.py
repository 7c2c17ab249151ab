"""Knowledge distillation: the KD loss, teachers from each source, the preflight tokenizer
check, and 2-rank runs that distil from a teacher trained by the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, losses, tiny_model, train

from pretrain.config import ConfigError, load_config
from pretrain.data.loader import PretrainDataset, make_loader
from pretrain.data.masking import IGNORE_INDEX
from pretrain.data.tokenizer import MODEL_FILE, Tokenizer
from pretrain.export.hf import save_hf
from pretrain.export.native import save_native
from pretrain.export.open import open_model
from pretrain.export.teacher import TeacherError, check_teacher, describe_teacher, load_teacher
from pretrain.model import SharedTransformer
from pretrain.objectives import compute_loss, kd_loss, model_inputs
from pretrain.objectives.distill import PROJECTION, hidden_loss, layer_map

CONFIG = REPO / "configs" / "tiny-albert.yaml"


def run_config(shards: Path, teacher: Path | str = "", *overrides: str):
    """The tiny-albert config over the test shards, at the tiny test models' size."""
    return load_config(
        CONFIG,
        [
            f"--data.path={shards}",
            "--model.vocab_size=97",
            "--data.seq_length=32",
            *([f"--distill.teacher={teacher}"] if teacher else []),
            *overrides,
        ],
    )


# -- the loss ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_hidden_loss_is_the_mse_of_matched_layers_at_real_tokens():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 5, 6, generator=g) for _ in range(2)]
    project = torch.nn.Linear(4, 6, bias=False)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding: never matched
    keep = mask.bool()
    loss, metrics = hidden_loss(student, teacher, [-1, 0, 1], project, mask)
    expected = [
        ((project(student[s])[keep] - teacher[t][keep]) ** 2).mean() for s, t in ((1, 0), (2, 1))
    ]
    assert torch.allclose(loss, torch.stack(expected).mean())
    assert float(metrics["hidden_loss"]) == float(loss)
    same, _ = hidden_loss(teacher, teacher, [0, 1], None, None)
    assert float(same) == 0.0


@pytest.mark.unit
def test_default_layer_map_lets_the_last_layers_meet():
    assert layer_map((), 4, 4) == [0, 1, 2, 3]
    assert layer_map((), 4, 12) == [2, 5, 8, 11]
    assert layer_map((), 4, 6) == [-1, 2, -1, 5]
    assert layer_map((), 6, 3) == [-1, 0, -1, 1, -1, 2]
    assert layer_map((0, 0, 1), 3, 2) == [0, 0, 1]


@pytest.mark.unit
def test_each_layer_application_of_a_shared_set_has_its_own_hidden_state():
    model = tiny_model(sharing={"strategy": "all"})
    ids = torch.randint(1, 97, (2, 12))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.cfg.num_layers
    # one shared set, four applications: four different outputs, the last the encoder's
    assert not torch.equal(out.hidden_states[0], out.hidden_states[1])
    h_BTH = model.embeddings(ids, None)
    ctx = model.attention_context(ids, None, h_BTH.dtype)
    assert torch.equal(out.hidden_states[-1], model.encoder(h_BTH, ctx)[0])
    assert model(ids).hidden_states is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--distill.hidden_weight=1"], "distill.hidden_weight needs a distill.teacher"),
        (["--distill.teacher=t", "--distill.layer_map=[0, 1]"], "distill.layer_map is set but"),
        (
            ["--distill.teacher=t", "--distill.hidden_weight=1", "--distill.layer_map=[0, 1]"],
            "distill.layer_map has 2 entries; it needs one per layer application",
        ),
        (
            [
                "--distill.teacher=t",
                "--distill.hidden_weight=1",
                "--distill.layer_map=[-1,-1,-1,-1]",
            ],
            r"distill.layer_map \(\[-1, -1, -1, -1\]\) takes teacher layers >= 0",
        ),
    ],
)
def test_hidden_matching_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, overrides)
    cfg = load_config(
        CONFIG,
        ["--distill.teacher=t", "--distill.hidden_weight=1", "--distill.layer_map=[0,0,1,-1]"],
    )
    assert cfg.distill.layer_map == (0, 0, 1, -1)


@pytest.mark.unit
def test_kd_loss_is_t_squared_kl_of_softened_distributions():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    for T in (1.0, 2.0, 4.0):
        expected = 0.0
        for row in range(2):
            p = torch.softmax(t[row] / T, -1)
            q = torch.softmax(s[row] / T, -1)
            expected += float((p * (p / q).log()).sum())
        loss, metrics = kd_loss(s, t, T)
        assert abs(float(loss) - T * T * expected / 2) < 1e-6
        assert float(metrics["kd_loss"]) == float(loss)
    same, _ = kd_loss(t, t, 3.0)
    assert abs(float(same)) < 1e-6


@pytest.mark.unit
@torch.no_grad()
def test_compute_loss_adds_alpha_kd_at_the_predicted_positions_only(shards_dir):
    cfg = run_config(shards_dir, "", "--distill.alpha=0.5", "--distill.temperature=2.0")
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    ids = torch.randint(5, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 7], labels[1, 9] = 11, 12, 13
    batch = {"input_ids": ids, "mlm_labels": labels}
    inputs = model_inputs(batch)
    out, t_out = student(**inputs), teacher(**inputs)
    assert out.logits.shape == (3, 97)
    plain, _ = compute_loss(out, batch, cfg)
    total, metrics = compute_loss(out, batch, cfg, t_out.logits)
    # by hand, from the full-sequence logits at the three predicted positions
    full_s, full_t = student(ids).logits, teacher(ids).logits
    where = labels != IGNORE_INDEX
    p = F.log_softmax(full_t[where] / 2.0, -1)
    kl = (p.exp() * (p - F.log_softmax(full_s[where] / 2.0, -1))).sum(-1).mean()
    assert abs(float(metrics["kd_loss"]) - 4.0 * float(kl)) < 1e-5
    assert abs(float(total) - float(plain) - 0.5 * 4.0 * float(kl)) < 1e-5
    assert "kd_loss" not in compute_loss(out, batch, cfg)[1]


@pytest.mark.unit
@torch.no_grad()
def test_causal_lm_distils_at_every_position(shards_dir):
    cfg = run_config(shards_dir, "", "--model.family=llama", "--distill.alpha=1.0")
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(5, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    out, t_out = student(**model_inputs(batch)), teacher(**model_inputs(batch))
    assert out.logits.shape == (2, 12, 97)
    _, metrics = compute_loss(out, batch, cfg, t_out.logits)
    p = F.log_softmax(t_out.logits, -1)
    kl = (p.exp() * (p - F.log_softmax(out.logits, -1))).sum(-1).mean()
    assert abs(float(metrics["kd_loss"]) - float(kl)) < 1e-5


# -- teachers from each source ------------------------------------------------------------------


@torch.no_grad()
def _same_logits(a: SharedTransformer, b: SharedTransformer) -> None:
    ids = torch.randint(5, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-5)


@pytest.mark.unit
def test_native_teacher_loads_frozen_and_leaves_the_rng_alone(shards_dir, tokenizer_dir, tmp_path):
    model = tiny_model(seed=4)
    save_native(model.state_dict(), model.cfg, tokenizer_dir, tmp_path / "native")
    cfg = run_config(shards_dir, tmp_path / "native")
    student = Tokenizer(tokenizer_dir)
    before = torch.get_rng_state()
    teacher = load_teacher(cfg, student, torch.device("cpu"), torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), before)
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    state = teacher.state_dict()
    assert all(torch.equal(state[k], v.bfloat16()) for k, v in model.state_dict().items())


@pytest.mark.unit
def test_a_layer_map_past_the_teachers_layers_is_refused(shards_dir, tokenizer_dir, tmp_path):
    model = tiny_model(seed=4)  # 4 layers
    save_native(model.state_dict(), model.cfg, tokenizer_dir, tmp_path / "native")
    hidden = ["--distill.hidden_weight=1", "--model.num_layers=2", "--distill.layer_map=[1,4]"]
    cfg = run_config(shards_dir, tmp_path / "native", *hidden)
    source = describe_teacher(tmp_path / "native")
    with pytest.raises(TeacherError, match=r"names teacher layer 4, .* has 4 layers \(0..3\)"):
        check_teacher(source, cfg, Tokenizer(tokenizer_dir))


@pytest.mark.unit
def test_hf_teacher_is_checked_by_its_vocabulary(shards_dir, tokenizer_dir, tmp_path):
    model = tiny_model(seed=5)
    save_hf(model.state_dict(), model.cfg, tokenizer_dir, tmp_path / "hf")
    source = describe_teacher(tmp_path / "hf")
    assert source.kind == "hf" and source.tokenizer_checksum is None  # no spiece.model
    check_teacher(source, run_config(shards_dir, tmp_path / "hf"), Tokenizer(tokenizer_dir))
    cfg = run_config(shards_dir, tmp_path / "hf")
    student = Tokenizer(tokenizer_dir)
    _same_logits(model, load_teacher(cfg, student, torch.device("cpu"), torch.float32))
    vocab_file = tmp_path / "hf" / "tokenizer.json"
    vocab = json.loads(vocab_file.read_text())
    vocab["model"]["vocab"][9][0] = "\u2581another"
    vocab_file.write_text(json.dumps(vocab))
    with pytest.raises(TeacherError, match=r"than this run.s \(vocabulary differs"):
        load_teacher(cfg, student, torch.device("cpu"), torch.float32)
    vocab_file.unlink()
    with pytest.raises(TeacherError, match="no tokenizer to check"):
        load_teacher(cfg, student, torch.device("cpu"), torch.float32)


@pytest.mark.e2e
def test_check_refuses_a_teacher_on_another_tokenizer_in_one_line(
    shards_dir, tokenizer_dir, tmp_path, cli
):
    model = tiny_model(seed=6)
    teacher = tmp_path / "hf"
    save_hf(model.state_dict(), model.cfg, tokenizer_dir, teacher)
    args = [
        "-m",
        "pretrain",
        "check",
        str(CONFIG),
        f"--data.path={shards_dir}",
        f"--train.output_dir={tmp_path / 'run'}",
        "--model.vocab_size=97",
        "--data.seq_length=32",
        f"--distill.teacher={teacher}",
    ]
    assert cli(*args).returncode == 0
    (teacher / MODEL_FILE).write_bytes(b"another sentencepiece model")  # checked first
    result = cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another tokenizer" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
    shutil.rmtree(teacher)
    missing = cli(*args)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    teacher.mkdir()
    empty = cli(*args)
    assert empty.returncode == 2 and "holds no model" in empty.stderr, empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1


# -- 2-rank runs ----------------------------------------------------------------------------------

STEPS = 8
DISTILL = ["--distill.alpha=2.0", "--distill.temperature=2.0"]


@pytest.fixture(scope="module")
def runs(shards_dir, tmp_path_factory):
    """A teacher trained for 40 steps from another seed, then 8-step students with and
    without distillation from its checkpoint (the distilled one under ZeRO-3)."""
    root = tmp_path_factory.mktemp("distill")
    teacher = root / "teacher"
    train(shards_dir, teacher, "--train.seed=7", "--train.max_steps=40", "--logging.every=10")
    plain, distilled = root / "plain", root / "distilled"
    train(shards_dir, plain, f"--train.max_steps={STEPS}")
    # ZeRO-3 partitions the student only: the teacher stays whole on every rank
    kd = [f"--distill.teacher={teacher}", *DISTILL, "--engine.zero_stage=3"]
    train(shards_dir, distilled, *kd, f"--train.max_steps={STEPS}")
    return {"teacher": teacher, "plain": plain, "distilled": distilled, "kd": kd}


def _kl_to_teacher(shards: Path, teacher_dir: Path, student_dir: Path) -> float:
    """Mean KL(teacher || student) at T=1 at the masked positions of held-out batches."""
    cfg = load_config(
        CONFIG, [f"--data.path={shards}", "--model.vocab_size=150", "--data.seq_length=48"]
    )
    trained = open_model(student_dir)
    student = SharedTransformer(trained.cfg)
    student.load_state_dict(trained.state)
    student.eval()
    teacher = open_model(teacher_dir)
    reference = SharedTransformer(teacher.cfg)
    reference.load_state_dict(teacher.state)
    reference.eval()
    data = PretrainDataset(cfg, "valid")
    loader = iter(make_loader(data, 0, 8))
    total = 0.0
    with torch.no_grad():
        for _ in range(4):
            inputs = model_inputs(next(loader))
            total += float(kd_loss(student(**inputs).logits, reference(**inputs).logits, 1.0)[0])
    return total / 4


@pytest.mark.distributed
def test_distillation_lowers_the_kl_to_the_teacher(runs, shards_dir):
    kd = losses(runs["distilled"], "kd_loss")
    assert sorted(kd) == list(range(1, STEPS + 1))
    assert kd[STEPS] < kd[1]
    assert "kd_loss" not in (runs["plain"] / "metrics.jsonl").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["distilled"] / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/kd_loss")] == list(range(1, STEPS + 1))
    with_kd = _kl_to_teacher(shards_dir, runs["teacher"], runs["distilled"])
    without = _kl_to_teacher(shards_dir, runs["teacher"], runs["plain"])
    assert with_kd < without, (with_kd, without)
    # the teacher is not saved with the student: its export holds only the student
    assert open_model(runs["distilled"]).state.keys() == open_model(runs["plain"]).state.keys()


@pytest.mark.distributed
def test_exact_resume_with_distillation(runs, shards_dir, tmp_path):
    out = tmp_path / "run"
    train(shards_dir, out, *runs["kd"], "--train.max_steps=4")
    second = train(shards_dir, out, *runs["kd"], f"--train.max_steps={STEPS}")
    assert "at step 4" in second.stderr and "distilling from" in second.stderr
    for key in ("loss", "kd_loss"):
        assert losses(out, key) == losses(runs["distilled"], key), key


HIDDEN = [
    "--model.hidden_size=32",  # narrower than the teacher: a learned projection to its width
    "--model.intermediate_size=64",
    "--distill.hidden_weight=1.0",
]


@pytest.mark.distributed
def test_hidden_states_are_matched_through_a_projection_that_export_leaves_out(
    runs, shards_dir, tmp_path
):
    out = tmp_path / "hidden"
    kd = [*runs["kd"], *HIDDEN]
    train(shards_dir, out, *kd, "--train.max_steps=4")
    second = train(shards_dir, out, *kd, f"--train.max_steps={STEPS}")
    assert "at step 4" in second.stderr
    hidden = losses(out, "hidden_loss")
    assert sorted(hidden) == list(range(1, STEPS + 1))
    assert hidden[STEPS] < 0.8 * hidden[1], hidden
    # the projection trains with the student (checkpointed, so resume is exact) ...
    straight = tmp_path / "straight"
    train(shards_dir, straight, *kd, f"--train.max_steps={STEPS}")
    for key in ("loss", "kd_loss", "hidden_loss"):
        assert losses(out, key) == losses(straight, key), key
    # ... and is not part of the model: the export holds the student's weights only
    trained = open_model(out)
    assert not any(k.startswith(PROJECTION) for k in trained.state)
    SharedTransformer(trained.cfg).load_state_dict(trained.state)
