"""``python -m dev.quant_overhead``: the in-process quantized / unquantized step ratio."""
import re

import pytest

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")
quant_overhead = pytest.importorskip("dev.quant_overhead")


def test_prints_one_positive_ratio_per_order_and_base(capsys):
    assert quant_overhead.main(["--bases", "nf4,int8", "--orders", "1,exact", "--rounds", "1",
                                "--batch", "1", "--seq", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "bitsandbytes" in lines[0] and lines[1].startswith("# quantized / unquantized step")
    assert [x.split(":")[0] for x in lines[2:]] == ["order 1", "order exact"]
    for line in lines[2:]:
        got = dict(re.findall(r"(nf4|int8) ([0-9.]+)", line))
        assert set(got) == {"nf4", "int8"} and all(float(v) > 0 for v in got.values())


@pytest.mark.parametrize("args, named", [(["--bases", "fp4"], "--bases"),
                                         (["--orders", "1,two"], "--orders")])
def test_bad_arguments_name_the_option_and_the_value(args, named, capsys):
    with pytest.raises(SystemExit):
        quant_overhead.main(args)
    err = capsys.readouterr().err
    assert named in err and args[1].split(",")[-1] in err
