"""Profiles as an attack surface: what a domain may select, and what a profile's snippets may write.

A domain's XML often comes from someone other than the operator (a tenant, an upload, an app's
template), so its metadata selects profiles by name on the search path only; files are the operator's
choice on the command line. Hypervisor pass-through (<qemu:commandline> and the other libvirt driver
namespaces) needs an opt-in in the profile and a trusted origin. Everything here runs the real CLI on real
files in real directories: nothing is mocked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lxml import etree
from support import cli

from virtpolicy.errors import ProfileError
from virtpolicy.profiles.library import check_name, find_profile, load_profile

REPO = Path(__file__).resolve().parent.parent
VP = "http://virtpolicy.org/xmlns/domain/1.0"
QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"
SECRET = "PLANTED-PROFILE-CONTENT-7f3a"
COMMANDLINE = f"<qemu:commandline xmlns:qemu='{QEMU}'><qemu:arg value='-{SECRET}'/></qemu:commandline>"


def domain(*names: str) -> bytes:
    """A partial domain whose metadata selects `names`; the first selection is on line 3."""
    selections = "".join(f"<virtpolicy:profile name='{n}'/>" for n in names)
    return f"""<domain type='kvm'><name>sec</name><memory unit='MiB'>1024</memory><vcpu>2</vcpu>
<metadata><virtpolicy:profiles xmlns:virtpolicy='{VP}'>
{selections}
</virtpolicy:profiles></metadata>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><source file='/sec.qcow2'/></disk></devices></domain>""".encode()


def profile_text(name: str, snippet: str = COMMANDLINE, opt_in: bool = True, action: str = "add") -> str:
    """A one-rule profile; the snippet's key is on line 8 with the opt-in, line 7 without."""
    allow = "allow_passthrough = true\n" if opt_in else ""
    return (
        f'name = "{name}"\nversion = "1"\ndescription = "{SECRET}"\n{allow}\n'
        f'[[rule]]\nid = "inject"\n{action} = """{snippet}"""\n'
    )


def private_dir(path: Path) -> Path:
    """A directory only this user can write: a trusted place, unlike a shared temp directory."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """An opted-in pass-through profile in a world-writable directory, as an attacker would leave it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "evil.toml"
    path.write_text(profile_text("evil"))
    path.chmod(0o666)
    return path


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    """Exit 1 with exactly one line on stderr, never an internal error or a traceback."""
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    assert err.startswith("virtpolicy: error: "), err
    return err


# --- a domain names profiles, never files ----------------------------------------------------------


def test_planted_profile_named_by_path_in_metadata_is_refused_without_leaking(planted: Path) -> None:
    done = cli("solve", "-", "--os", "fedora37", stdin=domain(str(planted)))
    err = one_line_error(done)
    assert err.startswith("virtpolicy: error: <stdin>:3: /domain/metadata/profiles/profile: "), err
    assert "never by file" in err and "accepted:" in err
    assert SECRET not in err and not done.stdout
    # existence is not leaked: a path that does not exist gets the same answer, word for word
    missing = planted.with_name("no-such-profile.toml")
    other = one_line_error(cli("solve", "-", "--os", "fedora37", stdin=domain(str(missing))))
    assert other.replace(str(missing), "P") == err.replace(str(planted), "P")


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../../etc/virtpolicy/profiles/windows",
        "./windows",
        "windows/",
        "sub/windows",
        ".hidden",
        "..",
        "a..b",
        "~root",
        "~/x",
        "a\\b",
        "-windows",
        "win dows",
        "x" * 300,
        "windows&#10;virtpolicy: error: forged second line",
    ],
)
def test_path_like_names_in_metadata_are_refused_with_the_xpath(name: str) -> None:
    done = cli("solve", "-", "--os", "fedora37", stdin=domain(name))
    err = one_line_error(done)
    assert "<stdin>:3: /domain/metadata/profiles/profile: profile name '" in err, err
    assert "is refused" in err


def test_nul_and_control_characters_are_refused_before_any_lookup() -> None:
    for name in ("win\x00dows", "win\ndows", "\x00"):
        with pytest.raises(ProfileError) as info:
            check_name(name, "d.xml:3: /domain/metadata/profiles/profile")
        assert "\n" not in str(info.value) and "\x00" not in str(info.value)
    assert check_name("windows-11") == "windows-11"
    assert check_name("vendor.tuned+1_x") == "vendor.tuned+1_x"


def test_no_current_directory_lookup_for_metadata(tmp_path: Path) -> None:
    """A file in the current directory is not on the search path, whatever the name looks like."""
    cwd = private_dir(tmp_path / "cwd")
    (cwd / "evil.toml").write_text(
        profile_text("evil", opt_in=False, snippet="<devices><watchdog model='i6300esb'/></devices>")
    )
    for name in ("evil", "evil.toml"):
        done = cli("solve", "-", "--os", "fedora37", stdin=domain(name), cwd=cwd)
        err = one_line_error(done)
        assert f"unknown profile '{name}'" in err and "available on the search path: " in err, err
        assert "windows" in err  # the names that ARE available, as libvirt lists accepted values
        assert str(cwd) not in err and SECRET not in err


def test_unknown_name_lists_only_names_on_the_path(tmp_path: Path) -> None:
    outside = private_dir(tmp_path / "outside")
    (outside / "secret-profile.toml").write_text(profile_text("secret-profile", opt_in=False, snippet="<devices/>"))
    path_dir = private_dir(tmp_path / "path")
    (path_dir / "mine.toml").write_text(
        'name = "mine"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "v"\nprefer = { "video.model" = ["vga"] }\n'
    )
    err = one_line_error(
        cli("solve", "-", "--os", "fedora37", "--profile-path", str(path_dir), stdin=domain("secret-profile"))
    )
    assert "mine" in err and "secret-profile'" in err  # the name the domain wrote, and what is available
    assert "secret-profile," not in err and str(outside) not in err


def test_a_name_on_the_search_path_works(tmp_path: Path) -> None:
    path_dir = private_dir(tmp_path / "profiles")
    (path_dir / "vga-please.toml").write_text(
        'name = "vga-please"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "v"\n'
        'prefer = { "video.model" = ["vga"] }\n'
    )
    done = cli("solve", "-", "--os", "fedora37", "-q", "--profile-path", str(path_dir), stdin=domain("vga-please"))
    assert done.returncode == 0, done.stderr.decode()
    root = etree.fromstring(done.stdout)
    assert root.find("devices/video/model").get("type") == "vga"
    applied = root.find(f"metadata/{{{VP}}}policy/{{{VP}}}applied")
    assert applied is not None and applied.get("name") == "vga-please"
    # and a shipped name needs no path at all
    shipped = cli("solve", "-", "--os", "fedora37", "-q", stdin=domain("headless-server"))
    assert shipped.returncode == 0, shipped.stderr.decode()


def test_a_file_on_the_command_line_still_works(tmp_path: Path) -> None:
    own = private_dir(tmp_path / "own")
    path = own / "cli-file.toml"
    path.write_text(
        'name = "cli-file"\nversion = "2"\ndescription = "d"\n[[rule]]\nid = "v"\n'
        'prefer = { "video.model" = ["vga"] }\n'
    )
    for spec in (str(path), f"{path}@2"):
        done = cli("solve", "-", "--os", "fedora37", "-q", "--profile", spec, stdin=domain("headless-server"))
        assert done.returncode == 0, done.stderr.decode()
        assert (
            etree.fromstring(done.stdout).find(f"metadata/{{{VP}}}policy/{{{VP}}}applied[@name='cli-file']") is not None
        )
    relative = cli("solve", "-", "--os", "fedora37", "-q", "--profile", "./cli-file.toml", stdin=domain(), cwd=own)
    assert relative.returncode == 0, relative.stderr.decode()
    pinned = one_line_error(cli("solve", "-", "--os", "fedora37", "--profile", f"{path}@1", stdin=domain()))
    assert "pinned to version 1" in pinned


# --- what snippets may write ----------------------------------------------------------------------

LIBVIRT_NS = "http://libvirt.org/schemas/domain"
PASSTHROUGH = {
    "qemu-commandline": COMMANDLINE,
    "qemu-capabilities": f"<qemu:capabilities xmlns:qemu='{QEMU}'><qemu:add capability='x'/></qemu:capabilities>",
    "qemu-override": f"<qemu:override xmlns:qemu='{QEMU}'><qemu:device alias='ua-x'/></qemu:override>",
    "qemu-deprecation": f"<qemu:deprecation xmlns:qemu='{QEMU}' behavior='crash'/>",
    "default-namespace": f"<commandline xmlns='{QEMU}'><arg value='-S'/></commandline>",
    "nested": f"<devices><disk><qemu:commandline xmlns:qemu='{QEMU}'/></disk></devices>",
    "attribute": f"<devices xmlns:q='{QEMU}'><watchdog model='i6300esb' q:arg='-S'/></devices>",
    "lxc": f"<lxc:namespace xmlns:lxc='{LIBVIRT_NS}/lxc/1.0'><lxc:sharenet type='netns' value='x'/></lxc:namespace>",
    "bhyve": f"<bhyve:commandline xmlns:bhyve='{LIBVIRT_NS}/bhyve/1.0'><bhyve:arg value='-x'/></bhyve:commandline>",
    "xen": f"<xen:commandline xmlns:xen='{LIBVIRT_NS}/xen/1.0'><xen:arg value='x'/></xen:commandline>",
    "vmware": f"<vmware:datacenterpath xmlns:vmware='{LIBVIRT_NS}/vmware/1.0'>dc</vmware:datacenterpath>",
    "test-driver": f"<test:runstate xmlns:test='{LIBVIRT_NS}/test/1.0'>5</test:runstate>",
    "https-variant": "<q:commandline xmlns:q='https://libvirt.org/schemas/domain/qemu/2.0/'/>",
}


@pytest.mark.parametrize("case", sorted(PASSTHROUGH))
@pytest.mark.parametrize("action", ["add", "default"])
def test_passthrough_snippets_are_refused_without_the_opt_in(case: str, action: str, tmp_path: Path) -> None:
    path = private_dir(tmp_path / "p") / "inject.toml"
    path.write_text(profile_text("inject", PASSTHROUGH[case], opt_in=False, action=action))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}:7: rule 'inject': '{action}' snippet adds "), message
    assert "hypervisor pass-through" in message and "allow_passthrough = true" in message
    done = cli("solve", "-", "--os", "fedora37", "--profile", str(path), stdin=domain())
    assert f"{path}:7: rule 'inject'" in one_line_error(done)


def test_profiles_check_reports_the_refused_snippet(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "p") / "inject.toml"
    path.write_text(profile_text("inject", opt_in=False))
    done = cli("profiles", "check", str(path))
    assert done.returncode == 1
    assert f"{path}:7: error: rule 'inject': 'add' snippet adds <qemu:commandline>" in done.stdout.decode()
    assert b"internal error" not in done.stdout + done.stderr


def test_opted_in_passthrough_from_a_trusted_directory_is_applied(tmp_path: Path) -> None:
    trusted = private_dir(tmp_path / "trusted")
    (trusted / "inject.toml").write_text(profile_text("inject"))
    done = cli("solve", "-", "--os", "fedora37", "-q", "--profile-path", str(trusted), stdin=domain("inject"))
    assert done.returncode == 0, done.stderr.decode()
    arg = etree.fromstring(done.stdout).find(f"{{{QEMU}}}commandline/{{{QEMU}}}arg")
    assert arg is not None and arg.get("value") == f"-{SECRET}"
    by_file = cli("solve", "-", "--os", "fedora37", "-q", "--profile", str(trusted / "inject.toml"), stdin=domain())
    assert by_file.returncode == 0, by_file.stderr.decode()


def test_opted_in_passthrough_in_a_world_writable_directory_is_refused(planted: Path) -> None:
    """Even named by the operator (--profile-path, --profile): a file anyone could have planted is not trusted."""
    for args in (("--profile-path", str(planted.parent)), ("--profile", str(planted))):
        selection = domain("evil") if args[0] == "--profile-path" else domain()
        err = one_line_error(cli("solve", "-", "--os", "fedora37", *args, stdin=selection))
        assert f"{planted}:8: rule 'inject' adds <qemu:commandline>" in err, err
        assert "writable by every user" in err and SECRET not in err


def test_opted_in_passthrough_from_the_user_directory_is_refused(tmp_path: Path) -> None:
    """$XDG_CONFIG_HOME is searched, but pass-through needs an origin the operator named."""
    config = tmp_path / "config"
    user = private_dir(config / "virtpolicy" / "profiles")
    (user / "inject.toml").write_text(profile_text("inject"))
    env = {"XDG_CONFIG_HOME": str(config)}
    err = one_line_error(cli("solve", "-", "--os", "fedora37", stdin=domain("inject"), env=env))
    assert "per-user profile directory" in err and "rule 'inject'" in err
    (user / "plain.toml").write_text(
        'name = "plain"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "v"\nprefer = { "video.model" = ["vga"] }\n'
    )
    ok = cli("solve", "-", "--os", "fedora37", "-q", stdin=domain("plain"), env=env)
    assert ok.returncode == 0, ok.stderr.decode()  # the user directory is still on the search path


def test_a_relative_xdg_config_home_is_ignored(tmp_path: Path) -> None:
    cwd = private_dir(tmp_path / "cwd")
    user = private_dir(cwd / "rel" / "virtpolicy" / "profiles")
    (user / "plain.toml").write_text(
        'name = "plain"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "v"\nprefer = { "video.model" = ["vga"] }\n'
    )
    err = one_line_error(
        cli("solve", "-", "--os", "fedora37", stdin=domain("plain"), cwd=cwd, env={"XDG_CONFIG_HOME": "rel"})
    )
    assert "unknown profile 'plain'" in err


def test_removing_passthrough_needs_no_opt_in(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "p") / "scrub.toml"
    scrub = f"<qemu:commandline xmlns:qemu='{QEMU}'><qemu:arg value='-S'/></qemu:commandline>"
    path.write_text(profile_text("scrub", scrub, opt_in=False, action="remove"))
    assert load_profile(path).passthrough == ()
    xml = domain().replace(
        b"</devices></domain>",
        f"</devices><qemu:commandline xmlns:qemu='{QEMU}'><qemu:arg value='-S'/></qemu:commandline></domain>".encode(),
    )
    done = cli("solve", "-", "--os", "fedora37", "-q", "--profile", str(path), stdin=xml)
    assert done.returncode == 0, done.stderr.decode()
    assert etree.fromstring(done.stdout).find(f"{{{QEMU}}}commandline") is None


@pytest.mark.parametrize("element", ["policy", "decision", "applied"])
def test_a_snippet_cannot_forge_the_engine_record(element: str, tmp_path: Path) -> None:
    forged = f"<metadata><virtpolicy:{element} xmlns:virtpolicy='{VP}' variable='machine' value='pc'/></metadata>"
    path = private_dir(tmp_path / "p") / "forge.toml"
    path.write_text(profile_text("forge", forged, opt_in=True))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}:8: rule 'inject': 'add' snippet writes <virtpolicy:{element}>")
    done = cli("solve", "-", "--os", "fedora37", "--profile", str(path), stdin=domain())
    assert "the engine's own record" in one_line_error(done)


def test_draft_xml_profiles_can_never_carry_passthrough(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "draft") / "spice-evil.xml"
    path.write_text(f"<profile name='spice-evil'>\n  <add>{COMMANDLINE}</add>\n</profile>\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}:2: rule 'add-1': 'add' snippet adds <qemu:commandline>")
    with pytest.raises(ProfileError):
        find_profile("spice-evil", [path.parent])


def test_set_cannot_create_a_namespaced_element(tmp_path: Path) -> None:
    axis = private_dir(tmp_path / "axis") / "axis.toml"
    axis.write_text(
        'name = "axis"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "s"\n'
        'set = { "devices/interface/child::driver/@queues" = "domain.vcpus" }\n'
    )
    assert load_profile(axis).rules[0].derive  # an XPath axis is not a namespace prefix
    path = private_dir(tmp_path / "p") / "setter.toml"
    path.write_text(
        'name = "setter"\nversion = "1"\ndescription = "d"\nallow_passthrough = true\n[[rule]]\nid = "s"\n'
        'set = { "qemu:commandline/text()" = "domain.vcpus" }\n'
    )
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "without a namespace prefix" in str(info.value) and str(info.value).startswith(f"{path}:")


def test_allow_passthrough_must_be_a_boolean(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "p") / "flag.toml"
    path.write_text(profile_text("flag", "<devices/>").replace("allow_passthrough = true", 'allow_passthrough = "yes"'))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}:4: allow_passthrough = 'yes'; accepted: true, false")
