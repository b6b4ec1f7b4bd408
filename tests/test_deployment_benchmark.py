"""benchmarks/deployment.py's command line: which configurations a run of it measures."""

from __future__ import annotations

import pytest

from benchmarks.deployment import parse_args, variant_label


def test_privacy_and_secagg_add_a_private_variant_beside_the_plain_one():
    args = parse_args(
        ["--sites", "3,10", "--privacy", "--secagg", "--runtimes", "stock,zygote+fast-poll"]
    )
    assert args.sites == [3, 10]
    assert args.variants == [[], ["privacy=sample_dp", "secagg=secaggplus"]]
    assert [variant_label(v) for v in args.variants] == ["plain", "DP + SecAgg+"]
    assert args.runtimes == ["stock", "zygote+fast-poll"]
    assert parse_args(["--secagg"]).variants == [[], ["secagg=secaggplus"]]
    assert parse_args([]).variants == [[]] and parse_args([]).sites == [3]


@pytest.mark.parametrize("sites", ["1", "three", ""])
def test_a_bad_site_count_is_refused(sites, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--sites", sites])
    assert "--sites" in capsys.readouterr().err
