"""Protocol P1 harness: windows, perplexity math and the `bivlm eval ppl` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bivlm_plugin.eval.data import P1, find_wikitext2, p1_windows, token_stream, windows
from bivlm_plugin.eval.ppl import perplexity


def test_windows_are_first_non_overlapping_slices() -> None:
    stream = torch.arange(25)
    w = windows(stream, seqlen=4, count=3)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_windows_too_short_names_sizes() -> None:
    with pytest.raises(ValueError, match="has 10 tokens, fewer than 3 windows x 4 = 12"):
        windows(torch.arange(10), seqlen=4, count=3)


def test_find_wikitext2_bad_path_says_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--data"):
        find_wikitext2(tmp_path / "nope")


def test_p1_windows_tokenize_whole_file_in_one_call(tiny_tokenizer, wikitext_dir) -> None:
    stream = token_stream(wikitext_dir / "test.txt", tiny_tokenizer)
    w = p1_windows(tiny_tokenizer, "eval", data=wikitext_dir)
    assert w.shape == (P1.eval_windows, P1.seqlen)
    assert torch.equal(w.flatten(), stream[: P1.eval_windows * P1.seqlen])
    c = p1_windows(tiny_tokenizer, "calib", data=wikitext_dir)
    assert c.shape == (P1.calib_windows, P1.seqlen)


def test_second_calibration_set_is_the_next_windows(tiny_tokenizer, wikitext_dir) -> None:
    """offset=128: the 128 windows after the protocol's own, disjoint from them."""
    stream = token_stream(wikitext_dir / P1.calib_file, tiny_tokenizer)
    second = p1_windows(tiny_tokenizer, "calib", data=wikitext_dir, offset=P1.calib_windows)
    n = P1.calib_windows * P1.seqlen
    assert second.shape == (P1.calib_windows, P1.seqlen)
    assert torch.equal(second.flatten(), stream[n : 2 * n])
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        p1_windows(tiny_tokenizer, "calib", data=wikitext_dir, offset=-1)
    with pytest.raises(ValueError, match="is for calibration windows"):
        p1_windows(tiny_tokenizer, "eval", data=wikitext_dir, offset=5)
    with pytest.raises(ValueError, match="fewer than"):
        p1_windows(tiny_tokenizer, "calib", data=wikitext_dir, offset=10**6)


class _UniformLM(torch.nn.Module):
    """Logits all zero: perplexity must equal the vocabulary size exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        class Out:
            logits = torch.zeros(*input_ids.shape, self.vocab)

        return Out()


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    res = perplexity(_UniformLM(37), torch.randint(0, 37, (5, 9)), batch_size=2, progress=False)
    assert res.n_tokens == 5 * 8
    assert res.ppl == pytest.approx(37.0, rel=1e-6)
    assert res.nll == pytest.approx(math.log(37.0), rel=1e-6)


def test_perplexity_matches_manual_nll(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)
    )
    res = perplexity(model, ids, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
    assert res.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_cli_eval_ppl_writes_json(tiny_llama_dir, wikitext_dir, tmp_path, capsys) -> None:
    from bivlm_plugin.cli import main

    out = tmp_path / "res" / "ppl.json"
    rc = main(
        [
            "eval",
            "ppl",
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(wikitext_dir),
            "--json",
            str(out),
            "--batch-size",
            "16",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "over 32704 tokens" in printed
    payload = json.loads(out.read_text())
    for key in ("ppl", "n_tokens", "seconds", "model", "protocol", "environment"):
        assert key in payload
    assert payload["n_tokens"] == 32704 and payload["protocol"] == "P1"
    assert payload["environment"]["packages"]["torch"].startswith("2.")
    # A random 500-word model is near-uniform: perplexity within a factor 3 of the vocabulary.
    assert 500 / 3 < payload["ppl"] < 500 * 3


def test_cli_eval_ppl_rejects_non_model_folder(tmp_path, capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["eval", "ppl", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
