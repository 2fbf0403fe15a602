"""pagewire.import_roots drops exactly the checkout roots from sys.path, and nothing else."""

from __future__ import annotations

import sys
import types

from pagewire.import_roots import drop_checkout_roots, is_checkout_root


def make_checkout(root):
    for folder in ("shared", "protos/pagewire", "kernels"):
        (root / folder).mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "shared" / "__init__.py").write_text("")
    (root / "kernels" / "__init__.py").write_text("")
    return root


def test_a_checkout_is_recognised_and_site_packages_is_not(tmp_path, monkeypatch):
    checkout = make_checkout(tmp_path / "checkout")
    assert is_checkout_root(str(checkout))
    assert not is_checkout_root(str(tmp_path))
    assert not is_checkout_root(next(p for p in sys.path if p.endswith("site-packages")))
    monkeypatch.chdir(checkout)
    assert is_checkout_root("")  # '' is the current directory (python -c)


def test_only_checkout_roots_and_modules_from_them_are_dropped(tmp_path, monkeypatch):
    checkout = make_checkout(tmp_path / "checkout")
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(checkout)
    monkeypatch.setattr(sys, "path", ["", str(other), str(checkout), *sys.path])
    shadowing = types.ModuleType("kernels")
    shadowing.__file__ = str(checkout / "kernels" / "__init__.py")
    submodule = types.ModuleType("kernels.rms_norm")
    elsewhere = types.ModuleType("pw_test_elsewhere")
    elsewhere.__file__ = str(other / "pw_test_elsewhere.py")
    monkeypatch.setitem(sys.modules, "kernels", shadowing)
    monkeypatch.setitem(sys.modules, "kernels.rms_norm", submodule)
    monkeypatch.setitem(sys.modules, "pw_test_elsewhere", elsewhere)
    assert drop_checkout_roots() == ["", str(checkout)]
    assert sys.path[0] == str(other)
    assert "kernels" not in sys.modules and "kernels.rms_norm" not in sys.modules
    assert sys.modules["pw_test_elsewhere"] is elsewhere
    assert drop_checkout_roots() == []
