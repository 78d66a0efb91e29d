"""HellaSwag: a fixture in the official file format, scored by `gptfast.eval` on a trained
checkpoint and independently, item by item, on the same weights exported to transformers."""

import json

import pytest
import torch
import torch.nn.functional as F

from gptfast import hellaswag
from gptfast.tokenizer import get_tokenizer
from gptfast.errors import DataError
from gptfast.eval import main as eval_main
from gptfast.trainer import Trainer

ITEMS = [
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    ("A woman opens the json module and", ["imports the decoder.", "reads the email headers.",
                                           "eats a sandwich quietly.", "writes a loads function."], 0),
    ("The parser reads a string and", ["returns a dict.", "raises ValueError on bad input.",
                                       "flies to the moon.", "sings."], 1),
    ("def dumps(obj, *, skipkeys=False,", ["ensure_ascii=True, check_circular=True):", "return 42",
                                           "the cat sat", "import os"], 0),
    ("An email message has headers and", ["a body.", "a payload of parts.", "three wheels.", "no end."], 1),
]


@pytest.fixture
def fixture_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    with open(path, "w") as f:
        for i, (ctx, endings, label) in enumerate(ITEMS):
            # the official file's fields, of which the scoring reads ctx, endings and label
            f.write(json.dumps({"ind": i, "activity_label": "test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                                "split": "val", "split_type": "indomain", "label": label, "endings": endings,
                                "source_id": f"test~{i}"}) + "\n")
    return path


@pytest.fixture
def trained_run(tiny_config, tmp_path):
    Trainer(tiny_config({"train.max_steps": 6}), log=lambda _: None).run()
    return tmp_path / "run"


def independent_scores(model, items):
    """Each of the 4 rows alone, unbatched and unpadded: (sum loss, mean loss) over the ending."""
    enc = get_tokenizer()
    out = []
    for item in items:
        context = enc.encode_ordinary(item.context)
        scores = []
        for ending in item.endings:
            tail = enc.encode_ordinary(" " + ending)
            ids = torch.tensor([context + tail])
            with torch.no_grad():
                output = model(ids)
            logits = getattr(output, "logits", output)  # transformers' output, or our logits
            losses = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")[len(context) - 1:]
            scores.append((losses.sum().item(), losses.mean().item()))
        out.append(scores)
    return out


def test_scores_match_transformers_on_the_exported_weights(trained_run, fixture_file, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from gptfast.export import main as export_main

    assert eval_main(["hellaswag", str(trained_run), "--input", str(fixture_file), "--json", "--device", "cpu",
                      "--batch", "2"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["items"] == len(ITEMS)
    assert export_main([str(trained_run), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    items = hellaswag.read_items(fixture_file)
    scores = independent_scores(hf_model, items)
    acc = sum(min(range(4), key=lambda j: s[j][0]) == item.label for s, item in zip(scores, items, strict=True))
    acc_norm = sum(min(range(4), key=lambda j: s[j][1]) == item.label for s, item in zip(scores, items, strict=True))
    assert ours["acc"] == acc / len(items) and ours["acc_norm"] == acc_norm / len(items)
    # the same predictions, item by item, from the exported directory through gptfast.eval too
    from gptfast.inference import load_any

    model, _, _ = load_any(str(tmp_path / "exported"), torch.device("cpu"))
    result = hellaswag.evaluate(model, items, get_tokenizer(), model.config.block_size, torch.device("cpu"), 3)
    assert result["predictions"] == [min(range(4), key=lambda j: s[j][1]) for s in scores]


def test_a_model_that_knows_the_answers_scores_one(fixture_file):
    """Scoring checked by construction: logits that put all mass on each correct ending's next token
    give acc = acc_norm = 1; the same logits shifted to a wrong ending give 0."""
    items = hellaswag.read_items(fixture_file)
    enc = get_tokenizer()

    def oracle(wrong: bool):
        rows = {}
        for item in items:
            tokens, _ = hellaswag.render(item, enc, 1024)
            pick = (item.label + 1) % 4 if wrong else item.label
            rows[tuple(tokens[pick])] = True

        def logits(ids):
            out = torch.zeros(ids.size(0), ids.size(1), 50257)
            for b in range(ids.size(0)):
                row = [t for t in ids[b].tolist()]
                for key in rows:
                    if tuple(row[:len(key)]) == key:
                        for t in range(len(key) - 1):
                            out[b, t, key[t + 1]] = 30.0
            return out
        return logits

    right = hellaswag.evaluate(oracle(False), items, enc, 1024, torch.device("cpu"), batch_items=2)
    assert right["acc"] == 1.0 and right["acc_norm"] == 1.0
    wrong = hellaswag.evaluate(oracle(True), items, enc, 1024, torch.device("cpu"), batch_items=3)
    assert wrong["acc_norm"] == 0.0


def test_evaluation_during_training_is_logged(tiny_config, fixture_file, tmp_path):
    Trainer(tiny_config({"eval.hellaswag_interval": 3, "eval.hellaswag_input": f'"{fixture_file}"',
                         "eval.hellaswag_limit": 3}), log=lambda _: None).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in logged] == [3, 6] and all(r["hellaswag_items"] == 3 for r in logged)
    assert all(0.0 <= r["hellaswag_acc_norm"] <= 1.0 for r in logged)


def test_bad_input_is_one_clear_error(tmp_path, trained_run, capsys):
    assert eval_main(["hellaswag", str(trained_run), "--input", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hellaswag: --input") and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(DataError, match="4 endings"):
        hellaswag.read_items(bad)
