"""The language-model task: readers byte for byte, the Transformer's causality, losses by hand, dense Hessians, resume."""

import io
import math
import tarfile

import pytest
import torch
from torch import nn

from eos_toolkit.adapters import adapter_for
from eos_toolkit.metrics import is_timing_metric
from eos_toolkit.modes import KernelFallbackWarning
from eos_toolkit.record import read_run
from eos_toolkit.tracker import SharpnessTracker
from experiments.config import RunConfig
from experiments.data import CorpusNotFoundError, load_corpus, resolve_corpus, text
from experiments.data.formats import checksum_of, read_brown_archive, read_gutenberg_archive
from experiments.data.sources import SHAKESPEARE_BOOKS
from experiments.models import build_transformer
from experiments.resolve import resolve
from experiments.tasks import build_task
from experiments.tasks.language import token_cross_entropy, unigram_perplexity, windows
from experiments.train import resume, train
from vradam import VRAdam

DT = torch.float64

# Public-domain text (Hamlet, act 3, scene 1), repeated into a corpus a tiny model can learn from.
HAMLET = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
          "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n")


@pytest.fixture
def hamlet_file(tmp_path):
    path = tmp_path / "hamlet.txt"
    path.write_bytes((HAMLET * 12).encode("utf-8"))
    return path


def tgz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------- readers

def test_brown_reader_strips_tags_and_splits_by_document():
    raw = tgz({
        "package/ca01": b"\n\n\tThe/at jury/nn said/vbd ./.\n\n\n\tIt/pps was/bedz 1/2/cd done/vbn ./.\n",
        "package/cb02": b"\tThe/at end/nn ./.\n",
        "package/README": b"not a document",
        **{f"package/c{c}{i:02d}": b"\tword/nn ./.\n" for c in "cd" for i in range(1, 10)},
    })
    docs = read_brown_archive(raw)
    assert "README" not in docs and len(docs) == 20
    assert docs["ca01"] == [["The", "jury", "said", "."], ["It", "was", "1/2", "done", "."]]
    corpus = text.word_corpus(docs, vocab_size=5, name="brown", source="test", checksum="x")
    again = text.word_corpus(read_brown_archive(raw), vocab_size=5, name="brown", source="test", checksum="x")
    assert corpus.split == again.split and corpus.vocab == again.vocab  # deterministic
    parts = corpus.split["documents"]
    assert sorted(parts["train"] + parts["valid"] + parts["test"]) == sorted(docs)
    assert (len(parts["train"]), len(parts["valid"]), len(parts["test"])) == (18, 1, 1)
    # Vocabulary: <unk>, <eos>, then the most frequent training words, ties alphabetical.
    train_words = [w for d in parts["train"] for s in docs[d] for w in s]
    counts = {w: train_words.count(w) for w in set(train_words)}
    top = sorted(counts, key=lambda w: (-counts[w], w))[:3]
    assert corpus.vocab == ["<unk>", "<eos>", *top]
    first_train_doc = docs[parts["train"][0]]
    expected = [corpus.vocab.index(w) if w in corpus.vocab else 0 for w in first_train_doc[0]] + [1]
    assert corpus.train[:len(expected)].tolist() == expected


def test_gutenberg_reader_decodes_latin1_and_normalises_crlf():
    raw = tgz({
        "package/gutenberg/shakespeare-hamlet.txt": "Caf\xe9 line one\r\nline two\r\n".encode("latin-1"),
        "package/gutenberg/austen-emma.txt": b"Emma\r\n",
        "package/gutenberg/README": b"x",
    })
    assert read_gutenberg_archive(raw) == {"austen-emma": "Emma\n",
                                           "shakespeare-hamlet": "Caf\xe9 line one\nline two\n"}
    assert list(read_gutenberg_archive(raw, SHAKESPEARE_BOOKS)) == ["shakespeare-hamlet"]


def test_wikitext_tokens_keep_their_vocabulary_and_end_lines_with_eos(tmp_path, monkeypatch):
    monkeypatch.delenv("EOS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = tmp_path / "data" / "wikitext-2"
    directory.mkdir(parents=True)
    (directory / "wiki.train.tokens").write_text(" = Title = \n\n The <unk> cat sat . \n")
    (directory / "wiki.valid.tokens").write_text(" The dog sat . \n")
    (directory / "wiki.test.tokens").write_text(" The cat . \n")
    corpus = load_corpus("wikitext-2", tmp_path / "data")
    decode = [corpus.vocab[i] for i in corpus.train.tolist()]
    assert decode == ["=", "Title", "=", "<eos>", "<eos>", "The", "<unk>", "cat", "sat", ".", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.valid.tolist()] == ["The", "dog", "sat", ".", "<eos>"]
    assert "dog" in corpus.vocab and corpus.level == "word"  # the files' own vocabulary, nothing mapped to <unk>
    assert len(corpus.checksum) == 64


def test_missing_corpus_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("EOS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(CorpusNotFoundError, match="eos data fetch brown"):
        load_corpus("brown", tmp_path)
    with pytest.raises(CorpusNotFoundError, match="eos data fetch gutenberg"):
        resolve_corpus("auto", tmp_path)
    with pytest.raises(ValueError, match="unknown corpus 'penn'"):
        resolve_corpus("penn", tmp_path)


# ---------------------------------------------------------------- the model and the losses

def test_the_transformer_is_causal():
    model = build_transformer(vocab_size=11, context=8, n_layer=2, n_head=2, d_model=16, seed=0).double()
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :5], b[:, :5])  # positions <= 4 never see position 5
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    for block in model.blocks:  # the same test fails for a model whose attention sees the future
        block.attn.causal = False
    assert not torch.allclose(model(tokens)[:, :5], model(changed)[:, :5])


def test_zero_read_out_gives_log_vocab_and_perplexity_is_exp_of_the_mean_token_loss():
    model = build_transformer(vocab_size=13, context=6, n_layer=1, n_head=1, d_model=8, tie_weights=False, seed=0)
    nn.init.zeros_(model.read_out.weight)
    tokens = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = float(token_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]))
    assert loss == pytest.approx(math.log(13), rel=1e-6)
    # Perplexity of a split, by hand: every target's -log softmax, averaged, exponentiated.
    model = build_transformer(vocab_size=13, context=6, n_layer=1, n_head=1, d_model=8, seed=2).double()
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    by_hand = []
    for i in range(3):
        for t in range(6):
            row = logits[i, t]
            by_hand.append(float(torch.logsumexp(row, 0) - row[tokens[i, t + 1]]))
    assert math.exp(sum(by_hand) / len(by_hand)) == pytest.approx(
        math.exp(float(token_cross_entropy(logits, tokens[:, 1:]))), rel=1e-12)


def test_windows_and_unigram_reference():
    ids = torch.arange(10)
    x, y = windows(ids, torch.tensor([0, 4]), 3)
    assert x.tolist() == [[0, 1, 2], [4, 5, 6]] and y.tolist() == [[1, 2, 3], [5, 6, 7]]
    train, targets = torch.tensor([0, 0, 1]), torch.tensor([1, 2])
    # add-one: p(0) = 3/6, p(1) = 2/6, p(2) = 1/6; ppl = exp(-(log 2/6 + log 1/6) / 2)
    assert unigram_perplexity(train, targets, 3) == pytest.approx(math.exp(-(math.log(2 / 6) + math.log(1 / 6)) / 2))


def dense_sharpness(model, x, y, P=None) -> float:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, [s.numel() for s in shapes]), shapes)}
        return token_cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # CPU flash attention has no double backward
        H = torch.autograd.functional.hessian(loss_of, theta)
    assert (H - H.T).abs().max() <= 1e-10 * H.abs().max()
    if P is not None:
        H = H / torch.sqrt(torch.outer(P, P))
    return float(torch.linalg.eigvalsh(H)[-1])


@pytest.mark.parametrize("optimizer", [None, "adamw", "vradam"])
def test_tracked_sharpness_of_a_tiny_transformer_equals_the_dense_hessian(optimizer):
    model = build_transformer(vocab_size=7, context=5, n_layer=1, n_head=2, d_model=4, seed=0).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 7, (4, 5), generator=g), torch.randint(0, 7, (4, 5), generator=g)
    P = None
    if optimizer is not None:
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw"
               else VRAdam(model.parameters(), lr=1e-2, beta3=10.0))
        for _ in range(3):
            opt.zero_grad()
            token_cross_entropy(model(x), y).backward()
            opt.step()
        P = adapter_for(opt).preconditioner(opt, list(model.parameters()))
    with pytest.warns(RuntimeWarning, match="math attention"):  # CPU flash attention has no forward-mode AD
        tracker = SharpnessTracker(model, token_cross_entropy, [(x[:2], y[:2]), (x[2:], y[2:])],
                                   precondition=P is not None, tol=1e-10, max_iter=300)
        measured = tracker.measure(P)
    key = "sharpness" if P is None else "precond_sharpness"
    assert measured[key] == pytest.approx(dense_sharpness(model, x, y, P), rel=1e-6)


def test_vradam_gate_is_the_same_with_one_group_or_three(hamlet_file):
    from experiments.optim import build_optimizer, parameter_groups

    cfg = resolve(RunConfig(task="language-model", dataset=f"text:{hamlet_file}", optimizer="vradam", lr=1e-2, beta3=5.0,
                    weight_decay=0.1, model_options={"n_layer": 1, "n_head": 2, "d_model": 16}, context=16,
                    device="cpu", dtype="float64"))
    cfg3 = resolve(RunConfig(**{**cfg.to_dict(), "no_decay_groups": True}))
    task = build_task(cfg, torch.device("cpu"), DT)
    models = [task.model, build_task(cfg3, torch.device("cpu"), DT).model]
    optimizers = [build_optimizer(c, parameter_groups(m, c)) for c, m in zip((cfg, cfg3), models)]
    assert [len(o.param_groups) for o in optimizers] == [1, 3]
    groups = optimizers[1].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    assert groups[2]["params"] == [models[1].token_embedding.weight, models[1].position_embedding.weight]
    x, y, _ = task.train_chunks(0)[0]
    for model, opt in zip(models, optimizers):
        opt.zero_grad()
        token_cross_entropy(model(x), y).backward()
        opt.step()
    a, b = (o.telemetry(0) for o in optimizers)
    assert float(a["sq_norm"]) == pytest.approx(float(b["sq_norm"]), rel=1e-12)
    assert float(a["eta"]) == pytest.approx(float(b["eta"]), rel=1e-12) and float(a["eta"]) < 1e-2


# ---------------------------------------------------------------- runs

def tiny_lm(hamlet_file, **overrides) -> RunConfig:
    return RunConfig(**{"task": "language-model", "dataset": f"text:{hamlet_file}", "context": 16, "batch_size": 8,
                        "track_n": 8, "eval_n": 8, "steps": 17, "track_every": 5, "device": "cpu",
                        "model_options": {"n_layer": 1, "n_head": 2, "d_model": 16}, **overrides})


def metric(run, name):
    m = run.metrics
    return m[m.metric == name].set_index("step")["value"]


def test_a_language_model_run_records_perplexities_and_its_data(hamlet_file, tmp_path):
    cfg = tiny_lm(hamlet_file, optimizer="adamw", lr=1e-2, steps=40, track_every=10, clip_norm=1.0)
    with pytest.warns(KernelFallbackWarning) as caught:
        train(cfg, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert run.status == "finished"
    # CPU flash attention has no forward-mode derivative: said once, in one plain line, and in the record
    (warning,) = [w for w in caught if w.category is KernelFallbackWarning]
    message = str(warning.message)
    assert "\n" not in message and "math attention" in message and "PyTorch" not in message
    fallbacks = [e for e in run.events if e["event"] == "kernel_fallback"]
    assert [(e["step"], e["message"]) for e in fallbacks] == [(0, message)]
    data = run.environment["data"]
    assert data["dataset"] == f"text:{hamlet_file}" and data["level"] == "char"
    assert "".join(data["vocab"]) == "".join(sorted(set(HAMLET)))
    assert sum(data["tokens"].values()) == len(HAMLET) * 12
    val, ppl = metric(run, "val_loss"), metric(run, "val_ppl")
    assert ppl.tolist() == pytest.approx([math.exp(v) for v in val])
    assert ppl.iloc[-1] < 0.7 * ppl.iloc[0]  # it learns
    assert metric(run, "val_ppl_unigram").nunique() == 1
    assert metric(run, "test_ppl").index.tolist() == [40]
    assert (metric(run, "grad_norm") > 0).all() and (metric(run, "tokens_per_second") > 0).all()
    assert metric(run, "precond_threshold").tolist() == pytest.approx([38 / 1e-2] * 5)


@pytest.mark.parametrize("full_batch", [False, True])
def test_kill_and_resume_a_language_model_run(hamlet_file, tmp_path, full_batch):
    cfg = tiny_lm(hamlet_file, optimizer="vradam", lr=1e-2, full_batch=full_batch, n_train=12, chunk_size=5,
                  steps=11, track_every=4, lanczos_max_iter=20, hvp_method="double_backward")

    class Kill(BaseException):
        pass

    def kill_at_10(step, total):
        if step == 10:  # after the checkpoint at 8
            raise Kill()

    with pytest.warns(RuntimeWarning):
        train(cfg, tmp_path / "whole")
        with pytest.raises(Kill):
            train(cfg, tmp_path / "killed", on_step=kill_at_10)
        resume(tmp_path / "killed")
    whole, resumed = read_run(tmp_path / "whole"), read_run(tmp_path / "killed")
    # the resumed process switched to plain kernels too, and says so
    assert [e["event"] for e in whole.events] == ["started", "kernel_fallback", "finished"]
    assert [e["event"] for e in resumed.events] == ["started", "kernel_fallback", "resumed", "kernel_fallback",
                                                    "finished"]
    a, b = (r.metrics[~r.metrics.metric.map(is_timing_metric)].sort_values(["step", "metric"]).reset_index(drop=True)
            for r in (whole, resumed))
    assert (a[["step", "metric"]] == b[["step", "metric"]]).all().all()
    assert a["value"].tolist() == b["value"].tolist()


def test_full_batch_trains_on_its_tracking_set(hamlet_file):
    cfg = resolve(tiny_lm(hamlet_file, full_batch=True, n_train=12, chunk_size=5, optimizer="gd", lr=0.1))
    task = build_task(cfg, torch.device("cpu"), torch.float32)
    chunks = task.train_chunks(0)
    assert [w for _, _, w in chunks] == pytest.approx([5 / 12, 5 / 12, 2 / 12])
    assert all(torch.equal(c[0], t[0]) for c, t in zip(chunks, task.track_batches))
    assert torch.equal(task.train_chunks(7)[0][0], chunks[0][0])  # the same every step
    minibatch = build_task(resolve(tiny_lm(hamlet_file)), torch.device("cpu"), torch.float32)
    assert not torch.equal(minibatch.train_chunks(0)[0][0], minibatch.train_chunks(1)[0][0])
    assert torch.equal(minibatch.train_chunks(3)[0][0], minibatch.train_chunks(3)[0][0])


def test_bad_language_model_configs_are_named(hamlet_file, tmp_path):
    with pytest.raises(ValueError, match="language-model trains model 'transformer', got model 'cnn-small'"):
        build_task(resolve(tiny_lm(hamlet_file, model="cnn-small")), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"fewer than context \+ 1 = 2001"):
        build_task(resolve(tiny_lm(hamlet_file, context=2000)), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="d_model=15 is not allowed; d_model must be a positive integer divisible"):
        build_task(resolve(tiny_lm(hamlet_file, model_options={"n_head": 2, "d_model": 15})), torch.device("cpu"),
                   torch.float32)


def test_a_latin1_text_file_is_read(tmp_path):
    """A text file is read as text (UTF-8, else latin-1); its checksum is of the bytes read."""
    path = tmp_path / "t.txt"
    path.write_bytes("na\xefve caf\xe9\r\n".encode("latin-1") * 30)
    corpus = load_corpus(f"text:{path}")
    assert "\r" not in corpus.vocab and "\xe9" in corpus.vocab
    assert corpus.checksum == checksum_of([path.read_bytes()])


def test_validation_perplexity_by_hand_over_uneven_chunks(hamlet_file):
    """exp of the mean token loss over every evaluated window, the windows spread over the whole split."""
    cfg = resolve(tiny_lm(hamlet_file, eval_n=7, chunk_size=3, dtype="float64"))
    task = build_task(cfg, torch.device("cpu"), DT)
    valid = task.tokens["valid"]
    n_windows = (len(valid) - 16 + 15) // 16  # starts 0, 16, ... below len - context
    expected_starts = [round(i * (n_windows - 1) / 6) * 16 for i in range(7)]
    x, y = task.eval_windows["val"]
    assert [int(row[0]) for row in x] == [int(valid[s]) for s in expected_starts]
    assert expected_starts[-1] >= len(valid) - 2 * 16  # the last window sits at the end of the split
    nll = []
    with torch.no_grad():
        for s in expected_starts:
            logits = task.model(valid[s:s + 16].unsqueeze(0))[0]
            for t in range(16):
                nll.append(float(torch.logsumexp(logits[t], 0) - logits[t, valid[s + t + 1]]))
    got = task.evaluate("val")
    assert float(got["val_ppl"]) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-10)
    whole = build_task(resolve(tiny_lm(hamlet_file, eval_n=None)), torch.device("cpu"), torch.float32)
    assert len(whole.eval_windows["val"][0]) == n_windows  # by default every window of the split


def test_tracking_windows_are_no_step_batch():
    from experiments.tasks.base import seeded_generator

    draws = {int(torch.randint(0, 2**62, (1,), generator=seeded_generator(0, 0, step))) for step in range(5000)}
    assert int(torch.randint(0, 2**62, (1,), generator=seeded_generator(0, 1))) not in draws
    assert len(draws) == 5000
