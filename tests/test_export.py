"""The export package's structure: the table of Hugging Face formats is complete, the
command-line tool is driven by it, and the checkpoint reader keeps deepspeed and
transformers out of an import of pretrain.export (engine/ in turn imports no export/)."""

from __future__ import annotations

import ast
import json

import pytest
from helpers import REPO

from pretrain import convert
from pretrain.config import ModelConfig
from pretrain.errors import UserError, main_guard
from pretrain.export import hf
from pretrain.families import FAMILIES


@pytest.mark.unit
@pytest.mark.parametrize("model_type", list(hf.FORMATS))
def test_each_row_has_what_it_needs(model_type):
    fmt = hf.FORMATS[model_type]
    assert fmt.model_type == model_type
    assert fmt.family in FAMILIES
    missing = [name for name in fmt.needs() if not callable(getattr(fmt.adapter, name, None))]
    assert not missing, f"{fmt.adapter.__name__} lacks {missing} for the {model_type} row"
    assert (fmt.tokenizer is not None) == fmt.exportable
    assert (fmt.pair_head is None) == (fmt.pretraining_class is None)
    assert bool(fmt.embeddings) == bool(fmt.layers), "fine-tuning needs both patterns"


@pytest.mark.unit
def test_each_family_exports_to_one_format():
    for family in FAMILIES:
        rows = [f for f in hf.FORMATS.values() if f.exportable and f.family == family]
        assert len(rows) == 1, (family, rows)
        assert hf.format_for_family(family) is rows[0]


@pytest.mark.unit
def test_export_classes_follow_the_pair_head():
    albert, llama = hf.FORMATS["albert"], hf.FORMATS["llama"]
    with_sop = ModelConfig(sop_head=True)
    without = ModelConfig(sop_head=False)
    assert albert.model_class_for(with_sop) == "AlbertForPreTraining"
    assert albert.model_class_for(without) == "AlbertForMaskedLM"
    assert llama.model_class_for(ModelConfig(family="llama")) == "LlamaForCausalLM"


@pytest.mark.unit
def test_unknown_model_type_is_one_error_naming_the_formats(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError) as err:
        hf.load_hf(tmp_path / "hf")
    expected = "cannot import model_type 'gpt2'; supported: albert, bert, llama"
    assert str(err.value) == expected
    argv = [
        "--from-hf",
        str(tmp_path / "hf"),
        "--format",
        "native",
        "--output",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: convert.main(argv))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


def imported_modules(path, nested: bool = True) -> set[str]:
    """Modules a file imports; without `nested`, only those imported with the file (not
    inside functions)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree) if nested else tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


@pytest.mark.unit
def test_engine_imports_neither_data_nor_export():
    for path in sorted((REPO / "pretrain" / "engine").glob("*.py")):
        bad = {
            m for m in imported_modules(path) if m.startswith(("pretrain.data", "pretrain.export"))
        }
        assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.unit
def test_export_modules_import_no_deepspeed_or_transformers_when_imported():
    for path in sorted((REPO / "pretrain" / "export").glob("*.py")):
        bad = {
            m
            for m in imported_modules(path, nested=False)
            if m.split(".")[0] in ("deepspeed", "transformers")
            # the manifest reader is standard library only (test_boundaries holds it so)
            or (m.startswith("pretrain.engine") and m != "pretrain.engine.manifest")
        }
        assert not bad, f"{path.name} imports {sorted(bad)} with itself"


@pytest.mark.parity
def test_rows_name_transformers_classes():
    import transformers

    for fmt in hf.FORMATS.values():
        for name in (fmt.config_class, fmt.model_class, fmt.auto_class, fmt.pretraining_class):
            assert name is None or hasattr(transformers, name), (fmt.model_type, name)
        config = getattr(transformers, fmt.config_class)()
        assert config.model_type == fmt.model_type
