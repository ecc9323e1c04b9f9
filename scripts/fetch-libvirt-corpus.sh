#!/usr/bin/env bash
# Fetch libvirt's own test-suite domains (Debian bookworm source package `libvirt`, 9.0.0: the same
# libvirt and QEMU 7.2 this project targets) into a cache dir, checksum-verified, never committed.
#
#   scripts/fetch-libvirt-corpus.sh [CACHE_DIR]     default: $REPO/.cache/libvirt-corpus
#
# Why a private apt configuration: the machine's own apt sources carry no deb-src lines, and the test
# set-up must not change the system's apt state. Everything apt writes (sources.list, lists, cache,
# state) lives under CACHE_DIR/apt; the system's apt.conf.d is still read (proxies, Check-Valid-Until)
# but its sources are not.
#
# Trust chain: apt verifies the InRelease signature with the Debian archive keyring, the Sources index
# against InRelease, and every downloaded file (.dsc, tarballs) against the Sources index. The script
# additionally checks the orig tarball's sha256 against the .dsc's Checksums-Sha256 itself, so a cached
# tarball that was tampered with or truncated is caught on later runs too.
#
# Only upstream files are extracted (from the orig tarball; Debian's patches do not touch tests/):
#   tests/qemuxml2xmloutdata/*.xml     libvirt's post-parse output domains (the corpus)
#   tests/qemuxml2argvdata/*.xml       their inputs, for reference
#   tests/domaincapsdata/qemu_{4.2.0..8.0.0}*.x86_64.xml   domain capabilities per QEMU version
#   tests/qemucapabilitiesdata/caps_{4.2.0..8.0.0}.x86_64.{xml,replies}   QEMU capabilities
#   src/conf/*.c src/qemu/*.c          the sources the knowledge tables cite (tests check each citation)
#
# Idempotent: when CACHE_DIR/.complete matches this script's extraction spec, it exits at once.
# stdout stays clean; progress goes to stderr.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.cache/libvirt-corpus}"
MIRROR="${LIBVIRT_CORPUS_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
PACKAGE=libvirt
UPSTREAM=9.0.0
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
QEMU_VERSIONS=(4.2.0 5.0.0 5.1.0 5.2.0 6.0.0 6.1.0 6.2.0 7.0.0 7.1.0 7.2.0 8.0.0)
# Patterns passed to tar --wildcards (below the tarball's top directory).
PATTERNS=(
  'tests/qemuxml2xmloutdata/*.xml'
  'tests/qemuxml2argvdata/*.xml'
  'src/conf/*.c'
  'src/qemu/*.c'
)
for v in "${QEMU_VERSIONS[@]}"; do
  PATTERNS+=("tests/domaincapsdata/qemu_${v}*.x86_64.xml" "tests/qemucapabilitiesdata/caps_${v}.x86_64.*")
done
SPEC="$PACKAGE $UPSTREAM $SUITE ${PATTERNS[*]}"

log() { echo "fetch-libvirt-corpus: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if [[ -f "$DEST/.complete" && "$(cat "$DEST/.complete")" == "$SPEC" ]]; then
  log "corpus present in $DEST"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"
[[ -r "$KEYRING" ]] || die "$KEYRING missing (package debian-archive-keyring)"

APTDIR="$DEST/apt"
mkdir -p "$APTDIR/etc/sources.list.d" "$APTDIR/etc/preferences.d" "$APTDIR/lists/partial" \
  "$APTDIR/cache/archives/partial" "$APTDIR/download"
echo "deb-src [signed-by=$KEYRING] $MIRROR $SUITE main" >"$APTDIR/etc/sources.list"
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APTDIR/etc/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/etc/sources.list.d"
  -o "Dir::Etc::Preferences=$APTDIR/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$APTDIR/etc/preferences.d"
  -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::Cache=$APTDIR/cache"
  -o "Dir::Cache::pkgcache=$APTDIR/cache/pkgcache.bin"
  -o "Dir::Cache::srcpkgcache=$APTDIR/cache/srcpkgcache.bin"
  -o "Dir::State::extended_states=$APTDIR/extended_states"
  # no binary indexes, translations or DEP-11 for a deb-src-only list
  -o "Acquire::Languages=none"
  # downloads go to a directory _apt may not be able to write into; stay root rather than warn
  -o "APT::Sandbox::User=root"
  # the system's Post-Invoke hooks (PackageKit, AppStream) are about the system's cache, not ours
  -o "APT::Update::Post-Invoke-Success::="
  -q
)

DL="$APTDIR/download"
ORIG="$DL/${PACKAGE}_${UPSTREAM}.orig.tar.xz"
# A download kept from an earlier run (only the extraction spec changed) is verified again below.
DSC="$(ls "$DL/${PACKAGE}_${UPSTREAM}"-*.dsc 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$DSC" || ! -f "$ORIG" ]]; then
  log "apt-get update ($MIRROR $SUITE, deb-src, private state in $APTDIR)"
  apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed"
  VERSION="$(apt-cache "${APT_OPTS[@]}" showsrc "$PACKAGE" 2>/dev/null |
    awk -v up="$UPSTREAM" '/^Version:/ { v = $2; sub(/^[0-9]+:/, "", v); if (index(v, up "-") == 1) print v }' |
    sort -V | tail -n 1)"
  [[ -n "$VERSION" ]] || die "no $PACKAGE $UPSTREAM source in $SUITE"
  DSC="$DL/${PACKAGE}_${VERSION}.dsc"
  log "apt-get source --download-only $PACKAGE=$VERSION"
  (cd "$DL" && apt-get "${APT_OPTS[@]}" source --download-only "$PACKAGE=$VERSION" >&2) ||
    die "apt-get source failed"
fi
VERSION="$(basename "$DSC" .dsc)"
VERSION="${VERSION#"${PACKAGE}_"}"
[[ -f "$DSC" ]] || die "$DSC not downloaded"
[[ -f "$ORIG" ]] || die "$ORIG not downloaded (not .tar.xz?)"

# The orig tarball against the .dsc's own Checksums-Sha256 (apt checked it against the signed Sources).
WANT="$(awk -v f="$(basename "$ORIG")" '
  /^Checksums-Sha256:/ { on = 1; next }
  /^[^ ]/ { on = 0 }
  on && $3 == f { print $1 }' "$DSC")"
[[ -n "$WANT" ]] || die "$DSC lists no sha256 for $(basename "$ORIG")"
GOT="$(sha256sum "$ORIG" | cut -d' ' -f1)"
if [[ "$GOT" != "$WANT" ]]; then
  rm -f "$ORIG"
  die "sha256 mismatch for $(basename "$ORIG"): got $GOT, the .dsc says $WANT (removed; run again)"
fi
log "sha256 ok: $(basename "$ORIG") $GOT"

TMP="$DEST/.extract.$$"
rm -rf "$TMP"
mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
WILD=()
# '*' stands for the tarball's top directory (libvirt-9.0.0); with --no-wildcards-match-slash it
# matches one path component only.
for p in "${PATTERNS[@]}"; do WILD+=("*/$p"); done
log "extracting ${#PATTERNS[@]} patterns from $(basename "$ORIG")"
tar -xJf "$ORIG" -C "$TMP" --strip-components=1 --wildcards --no-wildcards-match-slash "${WILD[@]}" ||
  die "extraction failed"
rm -rf "$DEST/tests" "$DEST/src"
mv "$TMP/tests" "$DEST/tests"
mv "$TMP/src" "$DEST/src"
for d in qemuxml2xmloutdata qemuxml2argvdata domaincapsdata qemucapabilitiesdata; do
  log "$d: $(find "$DEST/tests/$d" \( -type f -o -type l \) | wc -l) files (symlinks included)"
done
printf '%s\n' "$VERSION" >"$DEST/VERSION"
printf '%s\n' "$SPEC" >"$DEST/.complete"
log "corpus ready in $DEST (libvirt $VERSION)"
