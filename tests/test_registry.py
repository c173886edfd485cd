"""Registries of architectures, datasets and pipelines; the listing command; extension config keys."""
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2 import __main__ as dinov2_cli
from dinov2 import configs, extensions
from dinov2.configs import get_default_config
from dinov2.data import DATASETS, PIPELINES
from dinov2.models import build_model
from dinov2.models.vision_transformer import ARCHITECTURES, vit_small
from dinov2.utils.errors import UserError
from dinov2.utils.registry import Registry
from tiny import TINY_ARCH, make_tiny_vit

REPO = Path(__file__).resolve().parents[1]


def first_widget() -> str:
    return "first"


def second_widget() -> str:
    return "second"


def test_registering_a_name_twice_is_a_one_line_error_naming_it_and_the_module():
    widgets = Registry("widget")
    widgets.register("w", first_widget)
    with pytest.raises(UserError) as error:
        widgets.register("w", second_widget)
    assert str(error.value) == (
        f"widget 'w' is already registered (by {__name__}); pass replace=True to replace it"
    )
    assert widgets.lookup("w") is first_widget


def test_architecture_names_are_taken_once():
    with pytest.raises(UserError, match=r"^architecture 'vit_small' is already registered \(by dinov2\.models\."):
        ARCHITECTURES.register("vit_small", make_tiny_vit)
    assert ARCHITECTURES.lookup("vit_small") is vit_small


def test_replace_true_replaces_and_the_decorator_returns_the_object():
    widgets = Registry("widget")
    assert widgets.register("w")(first_widget) is first_widget
    assert widgets.register("w", replace=True)(second_widget) is second_widget
    assert widgets.lookup("w")() == "second" and widgets.names() == ["w"]


def test_the_same_definition_loaded_again_is_not_a_duplicate(tmp_path):
    """`python -m` runs a registering module a second time, as __main__."""
    (tmp_path / "rerun_data.py").write_text(
        "from dinov2.data.registry import register_dataset\n"
        "@register_dataset('RerunData')\n"
        "def rerun_data(transform=None, target_transform=None):\n"
        "    return []\n"
    )
    with DATASETS.scope():
        for module_name in ("rerun_data", "__rerun_main__"):
            spec = importlib.util.spec_from_file_location(module_name, tmp_path / "rerun_data.py")
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert DATASETS.owner("RerunData") == "__rerun_main__"


def test_unknown_name_is_one_line_listing_the_known_ones():
    widgets = Registry("widget")
    widgets.register("b", second_widget)
    widgets.register("a", first_widget)
    with pytest.raises(UserError) as error:
        widgets.lookup("c", where=" in 'c:x=1'")
    assert str(error.value) == "unknown widget 'c' in 'c:x=1'; known: a, b"
    with pytest.raises(UserError, match=r"^unknown student.arch 'vit_nope' \(given as 'nope'\); known: .*vit_small"):
        build_model({"arch": "nope"})


def test_temporary_registration_is_undone_even_after_an_error():
    with ARCHITECTURES.temporarily(TINY_ARCH, make_tiny_vit) as factory:
        assert factory is make_tiny_vit and ARCHITECTURES.lookup(TINY_ARCH) is make_tiny_vit
    assert TINY_ARCH not in ARCHITECTURES
    with pytest.raises(RuntimeError), ARCHITECTURES.temporarily(TINY_ARCH, make_tiny_vit):
        raise RuntimeError("test failed inside")
    assert TINY_ARCH not in ARCHITECTURES


def test_scope_undoes_registrations_and_replacements():
    with DATASETS.scope():
        DATASETS.register("ScopedData", first_widget)
        DATASETS.register("Synthetic", second_widget, replace=True)
    assert "ScopedData" not in DATASETS and DATASETS.owner("Synthetic") == "dinov2.data.datasets.synthetic"


def test_listing_includes_the_extensions_entries():
    assert {"VetStudies", "VetImages", "ImageFolder", "Synthetic"} <= set(DATASETS.names())
    assert {"dino", "multiview", "multiview_device"} <= set(PIPELINES.names())
    assert DATASETS.owner("VetStudies") == "vet_ext.pretraining.datasets" and PIPELINES.owner("multiview") == "vet_ext.pretraining.pipelines"


def test_list_command_prints_every_registry_with_owners(capsys):
    assert dinov2_cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "architectures (student.arch):"
    assert any(line.split() == ["vit_small", "dinov2.models.vision_transformer"] for line in lines)
    assert any(line.split() == ["VetStudies", "vet_ext.pretraining.datasets"] for line in lines)
    assert any(line.split() == ["multiview", "vet_ext.pretraining.pipelines"] for line in lines)
    assert lines[-1].startswith("registered, installed extensions included: 5 architectures, ")


def test_default_config_loads_the_extensions_itself(monkeypatch, tmp_path):
    (tmp_path / "fake_config_plugin.py").write_text(
        "from dinov2.configs import register_config_defaults\n"
        "def register():\n"
        "    register_config_defaults('fake', {'fake_plugin': {'size': 3}})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_point = importlib.metadata.EntryPoint(
        name="fake", value="fake_config_plugin:register", group=extensions.EXTENSIONS_GROUP
    )
    monkeypatch.setattr(extensions.importlib.metadata, "entry_points", lambda group: [entry_point])
    monkeypatch.setattr(extensions, "_loaded", False)
    monkeypatch.setattr(configs, "_extension_defaults", [])
    assert get_default_config().fake_plugin.size == 3


@pytest.mark.slow
def test_a_fresh_process_gets_the_plugin_keys_and_lists_its_entries():
    keys = subprocess.run(
        [sys.executable, "-c", "from dinov2.configs import get_default_config as d; c = d();"
         "print(c.crops.min_views_per_study, c.multiview.hflip_probability)"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    )  # fmt: skip
    assert keys.stdout.split() == ["1", "0.0"]
    listing = subprocess.run(
        [sys.executable, "-m", "dinov2", "--list"], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert "VetStudies" in listing.stdout and "multiview_device" in listing.stdout
