"""The taxonomy data: every row of the benchmark's tables, the schema, filters, CLI, methods."""

from __future__ import annotations

import json

import pytest
import yaml

from advprune.bench.taxonomy import (
    filter_taxonomy,
    legend,
    load_taxonomy,
    method_ap_key,
    taxonomy_entry,
)
from advprune.cli import main
from advprune.errors import ConfigError, UnknownNameError
from advprune.methods import Taxonomy, list_methods, method_class

# rows as printed in the benchmark's README tables (pipeline fields, 1S/IT, S/US, L/G, criterion)
EXPECTED = {
    "RADMM": ("after", ["AT"], ["AT"], ["1S"], ["S", "US"], ["L"], "SOLWM"),
    "HYDRA": ("after", ["AT"], ["AT"], ["1S"], ["US"], ["L"], "LIS"),
    "HARP": ("after", ["AT"], ["AT"], ["1S"], ["S", "US"], ["G"], "LIS"),
    "PwoA": ("after", ["AT"], ["KD"], ["1S"], ["US"], ["L"], "SOLWM"),
    "RSR": ("after", ["AT", "CNI"], ["n.s."], ["1S"], ["US"], ["G"], "RELWM"),
    "BNAP": ("after", ["AT"], ["AT"], ["1S", "IT"], ["S", "US"], ["G"], "LIS"),
    "RFP": ("after", ["AT"], ["AT"], ["1S"], ["S"], ["L"], "HGM"),
    "Deadwooding": ("after", ["n.s."], ["KD", "AT"], ["1S"], ["US"], ["G"], "SOLWM"),
    "SR-GKP": ("after", ["NT"], ["NT"], ["1S"], ["S"], ["L"], "LIS"),
    "RST": ("before", ["AT"], ["None"], ["1S"], ["US"], ["L"], "LIS"),
    "AWT": ("before", ["AT"], ["AT"], ["n.s."], ["US"], ["n.s."], "LWM"),
    "Cosentino19": ("before", ["AT"], ["AT"], ["IT"], ["US"], ["G"], "LWM"),
    "BCS-P": ("during", ["AT"], None, None, ["US"], ["L", "G"], "BCS"),
    "TwinRep": ("during", ["AT"], None, None, ["S", "US"], ["G"], "RELWM"),
}


def _fields(e):
    first = e.pretraining or e.pruning_step or e.training_step
    second = e.finetuning if e.pipeline == "after" else (
        e.training_step if e.pipeline == "before" else None)  # fmt: skip
    schedule = e.schedule and list(e.schedule)
    return (e.pipeline, list(first), second and list(second), schedule,
            list(e.structures), list(e.scopes), e.criterion)  # fmt: skip


def test_every_table_row_is_there():
    apb = [e for e in load_taxonomy() if e.source == "APB"]
    counts = {p: sum(e.pipeline == p for e in apb) for p in ("after", "before", "during")}
    assert counts == {"after": 15, "before": 6, "during": 5}
    assert len({e.ap_key for e in load_taxonomy()}) == len(load_taxonomy())
    for name, expected in EXPECTED.items():
        assert _fields(taxonomy_entry(name)) == expected, name
    bcsp = taxonomy_entry("BCS-P")
    assert bcsp.ap_key == "BCSP_Özdenizc2021Training" and bcsp.url.endswith("ozdenizci21a.pdf")
    assert taxonomy_entry("RFP").ap_key == "RFP_Lim2021Robustness"
    rsr = taxonomy_entry("RSR")
    assert (rsr.pretraining, rsr.finetuning, rsr.pruning_step) == (("AT", "CNI"), ("n.s.",), None)
    assert taxonomy_entry("HYDRA_Sehwag2020Hydra").name == "HYDRA"
    assert legend()["SOLWM"] == "SOLver-based LWM" and legend()["LIS"] == "Least Importance Score"
    codes = {"AT", "NT", "KD", "CNI", "1S", "IT", "S", "US", "L", "G", "n.s.", "None"}
    assert codes | {"LWM", "SOLWM", "RELWM", "LIS", "HGM", "BCS"} <= set(legend())


def test_every_leaderboard_name_is_a_taxonomy_entry():
    from advprune.bench.reference import reference_results

    names = {r.name for r in reference_results()}
    assert len(names) == 10
    for r in reference_results():
        assert taxonomy_entry(r.name).ap_key == r.ap_key


def test_advprune_methods_declare_their_entry():
    assert method_ap_key("hydra") == "HYDRA_Sehwag2020Hydra"
    assert method_ap_key("harp") == "HARP_Zhao2023Holistic"
    assert {method_ap_key(n) for n in ("lwm", "lwm-iterative", "binary")} == {
        "LWM_Han2015Learning", "LWMIT_Zhu2017Prune", "Binary_Liu2022Robust"}  # fmt: skip
    for name in list_methods():
        cls = method_class(name)
        entry = taxonomy_entry(method_ap_key(name))
        # the declared classification is the data entry, field by field
        data = entry.model_dump(mode="json", exclude={"name", "url", "source"})
        assert cls.taxonomy.classification() == data, name
        assert (entry.source == "APB") == (name in ("hydra", "harp")), name
        # what advprune implements is separate: HYDRA also prunes filters, HARP prunes locally
        granularity = {"unstructured": "US", "filters": "S", "channels": "S", "nm": "US"}
        implemented = {granularity[s] for s in cls.structures}
        if entry.source == "advprune":
            assert implemented == set(entry.structures), name
    assert method_class("hydra").structures == ("unstructured", "filters", "channels", "nm")
    assert method_class("hydra").taxonomy.structures == ("US",)
    assert method_class("harp").taxonomy.scopes == ("G",)
    config = json.loads(json.dumps(method_class("lwm")(0.5).config()))
    assert config["taxonomy"]["schedule"] == ["1S"] and config["taxonomy"]["criterion"] == "LWM"
    with pytest.raises(UnknownNameError, match="valid methods"):
        method_ap_key("nosuch")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"criterion": "magnitude"}, "criterion code 'magnitude'"),
        ({"structures": ("unstructured",)}, "structures code 'unstructured'"),
        ({"training_step": ("AT",)}, "not one of pipeline 'after'"),
        ({"finetuning": None}, "needs the field 'finetuning'"),
        ({"pipeline": "sideways"}, "pipeline 'sideways'"),
        ({"scopes": ()}, "scopes needs at least one code"),
    ],
)
def test_bad_method_declaration_rejected(fields, message):
    good = dict(
        ap_key="X_Y2020Z", pipeline="after", pretraining=("AT",), finetuning=("AT",),
        schedule=("1S",), structures=("US",), scopes=("L",), criterion="LIS")  # fmt: skip
    assert Taxonomy(**good).classification()["structures"] == ["US"]
    with pytest.raises(ValueError, match=f"taxonomy of 'X_Y2020Z': .*{message}"):
        Taxonomy(**{**good, **fields})


def test_filters():
    names = lambda es: {e.name for e in es}  # noqa: E731
    assert names(filter_taxonomy(criterion="HGM")) == {"RFP"}
    assert names(filter_taxonomy(criterion=["HGM", "BCS"])) == {"RFP", "BCS-P"}
    during_s = filter_taxonomy(pipeline="during", structure="S")
    assert names(during_s) == {"TwinRep", "DNR", "InTrain"}
    it_before = names(filter_taxonomy(pipeline="before", schedule="IT"))
    assert it_before == {"Cosentino19", "Wang20", "RobustBird"}
    assert all("G" in e.scopes for e in filter_taxonomy(scope="G"))
    for kind, bad in [("pipeline", "sideways"), ("structure", "X"), ("criterion", "MAG")]:
        with pytest.raises(ConfigError, match=f"unknown {kind}"):
            filter_taxonomy(**{kind: bad})
    with pytest.raises(UnknownNameError, match="taxonomy method"):
        taxonomy_entry("NoSuchMethod")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(criterion="MAGIC"), "criterion code 'MAGIC'"),
        (lambda m: m.pop("finetuning"), "needs the field 'finetuning'"),
        (lambda m: m.update(training_step=["AT"]), "not one of pipeline"),
        (lambda m: m.update(ap_key="a_b_c"), "model key"),
        (lambda m: m.update(colour="red"), "colour"),
        (lambda m: m.update(structures=[]), "structures needs at least one code"),
        (lambda m: m.update(pipeline="sideways"), "pipeline"),
    ],
)
def test_malformed_data_rejected(tmp_path, change, message):
    from importlib import resources

    data = yaml.safe_load(
        (resources.files("advprune.bench") / "data" / "taxonomy.yaml").read_text("utf-8")
    )
    change(data["methods"][1])  # HYDRA, a pipeline-A entry
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(ConfigError, match="method 'HYDRA'") as info:
        load_taxonomy(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_legend_must_expand_every_code(tmp_path):
    from importlib import resources

    data = yaml.safe_load(
        (resources.files("advprune.bench") / "data" / "taxonomy.yaml").read_text("utf-8")
    )
    del data["legend"]["HGM"]
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(ConfigError, match="legend does not expand HGM"):
        load_taxonomy(path)
    path.write_text("methods: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_taxonomy(path)


def test_cli(capsys):
    assert main(["taxonomy", "--pipeline", "before", "--schedule", "IT"]) == 0
    out = capsys.readouterr().out
    assert "RobustBird_Chen2021Sparsity" in out and "HYDRA" not in out and "3 methods" in out
    assert main(["taxonomy", "--criterion", "HGM", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["RFP"] and rows[0]["structures"] == ["S"]
    assert main(["taxonomy", "--criterion", "HGM", "--criterion", "BCS", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == {"RFP", "BCS-P"}
    assert main(["taxonomy", "--pipeline", "during", "--structure", "S"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["TwinRep", "DNR", "InTrain"]
    assert main(["taxonomy", "--criterion", "LWM", "--schedule", "IT"]) == 0
    out = capsys.readouterr().out
    assert "LWM-IT*" in out and "Sehwag19 " in out and "* advprune's own method" in out
    assert "legend: " in out and "IT: Iterative pruning" in out
    assert main(["taxonomy", "--scope", "X"]) == 2
    assert capsys.readouterr().err == "error: unknown scope X; valid: G, L\n"
    assert main(["taxonomy", "--structure", "XS"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown structure XS") and err.count("\n") == 1
