"""Honest totals: a quantized layer saved dense is charged its dense width, never packed rates."""

from __future__ import annotations

import logging

import pytest

from bivlm_plugin.app.quantize import _add_file_bits


def _report() -> dict:
    return {
        "storage_bits": 1.27,
        "layers": [
            {"name": "a", "shape": [8, 64], "storage_bits": 1.27},
            {"name": "b", "shape": [8, 192], "storage_bits": 1.27},  # could not be packed
        ],
    }


def test_dense_layer_is_charged_sixteen_bits(caplog) -> None:
    report = _report()
    with caplog.at_level(logging.WARNING, logger="bivlm_plugin.app.quantize"):
        _add_file_bits(report, {"a": 1.30}, {"a": 64}, dense_bits=16)
    a, b = report["layers"]
    assert a["storage_bits_from_files"] == 1.30 and "kept_dense" not in a
    assert b["storage_bits_from_files"] == 16.0 and b["kept_dense"] is True
    assert report["dense_layers"] == ["b"] and report["packed_layers"] == 1
    assert report["storage_bits_from_files"] == pytest.approx((1.30 * 512 + 16 * 1536) / 2048)
    assert "saved dense at 16 bits" in caplog.text and "'b'" in caplog.text


def test_all_packed_has_no_dense_layers() -> None:
    report = _report()
    _add_file_bits(report, {"a": 1.30, "b": 1.25}, {"a": 64, "b": 192})
    assert report["dense_layers"] == []
    assert report["storage_bits_from_files"] == pytest.approx((1.30 * 512 + 1.25 * 1536) / 2048)


def test_packed_layer_missing_from_files_fails_naming_it() -> None:
    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        _add_file_bits(_report(), {"a": 1.3}, {"a": 64, "b": 192})
