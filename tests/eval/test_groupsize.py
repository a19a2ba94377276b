from trtcompress.eval.groupsize import groupsize_table


def test_table_shows_unmeasured_gsm8k_metrics_as_dashes():
    """`bench groupsize --gsm8k-problems 0` measures no GSM8K metrics: the table printed after minutes of
    sweeping must show "-" for them, not crash formatting None."""
    from rich.console import Console

    row = dict(label="INT4_G128", bits_per_param=4.135, weight_bytes=70e6, ppl=32.27, ppl_ratio=1.65)
    table = groupsize_table([row | dict(gsm8k_kl=None, gsm8k_top1=None, gsm8k_bpb=None)])
    console = Console(width=160, record=True)
    console.print(table)
    text = console.export_text()
    assert "INT4_G128" in text and "32.27" in text and "-" in text


def test_rows_are_written_as_strict_json(tmp_path):
    """groupsize.json held a bare Infinity for a point broken past float range, which jq refuses."""
    import json
    import math

    from trtcompress.eval.groupsize import write_rows

    def refuse(name: str):
        raise ValueError(f"bare {name}")

    path = write_rows([{"label": "INT2_G128", "ppl": math.inf, "ppl_ratio": math.nan}], tmp_path / "out")
    row = json.loads(path.read_text(), parse_constant=refuse)[0]
    assert row["ppl"] == "Infinity" and row["ppl_ratio"] == "NaN"
