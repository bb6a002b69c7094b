"""`mergekit-cabs tune`'s data: fit and held-out windows spread along the file."""

from __future__ import annotations

import pytest

from mergekit_cabs import tune as tn


class _CountingTokenizer:
    """Token i of the text is the number i: windows are easy to recognise."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [int(w) for w in text.split()]}


@pytest.mark.parametrize("fraction, held", [(0.5, [1, 3, 5, 7, 9]), (0.7, [3, 6, 9]), (0.2, [1, 2, 3, 4, 6, 7, 8, 9])])
def test_split_spreads_held_out_windows_along_the_file(tmp_path, fraction, held):
    path = tmp_path / "d.txt"
    path.write_text(" ".join(str(i) for i in range(43)))  # 10 windows of 4, 3 tokens left over
    data = tn.load_task_data("d", path, _CountingTokenizer(), window=4, fit_fraction=fraction, max_windows=64)
    assert [int(w[0]) // 4 for w in data.heldout] == held
    assert sorted([int(w[0]) // 4 for w in data.fit] + held) == list(range(10))
    thinned = tn.load_task_data("d", path, _CountingTokenizer(), window=4, fit_fraction=0.5, max_windows=2)
    assert [int(w[0]) // 4 for w in thinned.fit] == [0, 8] and [int(w[0]) // 4 for w in thinned.heldout] == [1, 9]
