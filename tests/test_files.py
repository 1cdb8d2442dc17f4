import pytest
import torch
from safetensors.torch import save_file

from vitlora.files import atomic_directory, atomic_write, check_output_path, read_state_dict


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.json").write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "a.json").write_text("1")
        (tmp / "b.bin").write_bytes(b"2")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "b.bin"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkdtemp's private 0700


def test_atomic_directory_replaces_an_earlier_export_but_never_an_unrelated_folder(tmp_path):
    target = tmp_path / "adapter"
    for value in ("old", "new"):
        with atomic_directory(target) as tmp:
            (tmp / "a.json").write_text(value)
    assert (target / "a.json").read_text() == "new"
    (target / "notes.txt").write_text("mine")
    with (
        pytest.raises(FileExistsError, match=r"adapter: exists and holds \['notes.txt'\]"),
        atomic_directory(target) as tmp,
    ):
        (tmp / "a.json").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "notes.txt"]
    assert (target / "a.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporaries left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"), atomic_directory(tmp_path / "file"):
        pass


def test_read_state_dict_reads_safetensors_and_weights_only_checkpoints(tmp_path):
    weights = {"w": torch.arange(4.0)}
    save_file(weights, tmp_path / "w.safetensors")
    torch.save({"state_dict": weights}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        assert torch.equal(read_state_dict(tmp_path / name)["w"], weights["w"])


class _Exploit:
    def __reduce__(self):
        return (exec, ("import builtins; builtins.VITLORA_FILES_PWNED = True",))


def test_read_state_dict_never_unpickles_objects(tmp_path):
    import builtins

    torch.save({"w": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: cannot be read as a weights-only"):
        read_state_dict(tmp_path / "evil.pth")
    assert not hasattr(builtins, "VITLORA_FILES_PWNED")


@pytest.mark.parametrize("name", ["bad.safetensors", "missing.pth"])
def test_read_state_dict_names_the_file(tmp_path, name):
    (tmp_path / "bad.safetensors").write_text("nope")
    with pytest.raises((ValueError, FileNotFoundError), match=name):
        read_state_dict(tmp_path / name)


def test_check_output_path_refuses_before_any_work(tmp_path):
    assert check_output_path(tmp_path / "m.onnx", (".onnx",)) == tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"m\.txt: the output must end in \.csv or \.json"):
        check_output_path(tmp_path / "m.txt", (".csv", ".json"))
    with pytest.raises(FileNotFoundError, match=r"m\.onnx: the output folder .*missing does not exist"):
        check_output_path(tmp_path / "missing" / "m.onnx", (".onnx",))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(IsADirectoryError, match=r"dir\.onnx: is a folder"):
        check_output_path(tmp_path / "dir.onnx", (".onnx",))
    assert not (tmp_path / "missing").exists()
