"""The optional-import helpers (bloodcell.extras): a missing [train] module is one line naming the feature and the
install; any other missing module is a packaging bug and surfaces as it is."""

import sys

import pytest

from bloodcell.errors import BloodcellError, MissingExtra
from bloodcell.extras import INSTALL_TRAIN, lazy_face, needs_train_extra, optional, require


def test_optional_gives_none_only_for_an_absent_module(monkeypatch, tmp_path):
    assert optional("json").__name__ == "json"
    assert optional("no_such_module_for_bloodcell") is None
    # a module that is there but imports one that is not is broken, not optional
    (tmp_path / "half_there.py").write_text("import no_such_dependency_for_bloodcell\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_for_bloodcell"):
        optional("half_there")


def test_require_names_the_feature_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the light install: `import timm` raises ModuleNotFoundError
    with pytest.raises(MissingExtra) as info:
        require("timm", "the model zoo")
    message = str(info.value)
    assert message.startswith("the model zoo needs PyTorch") and "timm is not installed" in message
    assert INSTALL_TRAIN in message and "\n" not in message
    assert isinstance(info.value, BloodcellError) and isinstance(info.value, ModuleNotFoundError)
    assert require("json", "anything").__name__ == "json"


def test_needs_train_extra_passes_other_missing_modules_through():
    with pytest.raises(ModuleNotFoundError) as info:
        with needs_train_extra("x"):
            raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")
    assert not isinstance(info.value, MissingExtra)
    with pytest.raises(MissingExtra, match="^Grad-CAM needs"):
        with needs_train_extra("Grad-CAM"):
            raise ModuleNotFoundError("No module named 'pytorch_grad_cam'", name="pytorch_grad_cam")


def test_lazy_face_imports_a_name_on_first_use_only(monkeypatch, tmp_path):
    (tmp_path / "lazy_target_for_bloodcell.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_target_for_bloodcell", raising=False)
    face = lazy_face("pkg", {"VALUE": "lazy_target_for_bloodcell"})
    assert "lazy_target_for_bloodcell" not in sys.modules
    assert face("VALUE") == 42 and "lazy_target_for_bloodcell" in sys.modules
    with pytest.raises(AttributeError, match="^module 'pkg' has no attribute 'other'$"):
        face("other")
