"""bench/byod_probe.py's bad input: one line, exit 2, before any model or data is read."""
import pytest
from conftest import load_bench


@pytest.fixture
def bench(monkeypatch):
    return load_bench("byod_probe", monkeypatch)


@pytest.mark.parametrize("value, message", [("abc", "--pretrain 'abc': give comma-separated step counts"),
                                            ("250,0", "--pretrain '250,0': step counts must be positive")])
def test_bad_pretrain_steps_are_refused_in_one_line(value, message, capsys, bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--pretrain", value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_is_refused_in_one_line(tmp_path, capsys, bench):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--data", str(tmp_path / "none"), "--pretrain", "5"])
    assert exit_.value.code == 2 and "no train.json" in capsys.readouterr().err
