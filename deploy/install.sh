#!/usr/bin/env bash
# install.sh - install every system dependency of away on Debian 12 (bookworm), idempotently.
#
#   apt packages   containerd, runc, Docker engine, QEMU, protoc, iptables, busybox, cpio, ...
#   CRIU >= 4.2    built from Debian testing's source with away's patches (deploy/criu/) into
#                  /opt/away-criu; verified with `criu check`. bookworm's 3.17 fails on current kernels ("vdso:
#                  Unexpected rt vDSO area bounds") and 4.1 cannot dump TCP sockets on kernels
#                  >= 6.16 (SO_PASSCRED became AF_UNIX-only; fixed in CRIU 4.2).
#   guest kernel   vmlinuz + virtio-net modules of Debian's linux-image-amd64 -> /opt/away-guest
#   schemathesis   pinned, in its own venv /opt/away-schemathesis (tests/schemathesis.sh)
#   runtimes       a runtime profile in /opt/away-runtimes/NAME, made the active one:
#                    current   (default) containerd 2.1 and Docker 28 from Debian's newest line
#                              ($AWAY_RUNTIME_SUITE, default forky), unpacked beside the system
#                              from packages checked through apt's signed index; the newest
#                              runc whose package runs on this glibc
#                    debian12  Debian 12's own containerd 1.6, Docker 20.10 and runc 1.1
#                  usage: install.sh [--profile current|debian12]; then services.sh restart.
#                  Without --profile (or AWAY_RUNTIME_PROFILE) the active profile stays.
#
# A second run changes nothing and takes about a second. Daemons are started by
# deploy/services.sh, not here. Environment: DEBIAN_MIRROR (default: the first archive in
# the machine's apt sources), AWAY_CRIU_SUITE (default forky, Debian 14 "testing").
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=lib.sh
. "$HERE/lib.sh"

# default: the profile already active (a re-run keeps the user's choice), else current
PROFILE=${AWAY_RUNTIME_PROFILE:-}
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    --profile) [ $# -ge 2 ] || die "--profile needs a name: current or debian12"; PROFILE=$2; shift 2 ;;
    --profile=*) PROFILE=${1#--profile=}; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$PROFILE" ] || { PROFILE=$(active_profile); [ "$PROFILE" != none ] || PROFILE=current; }
case $PROFILE in current|debian12) ;; *) die "unknown runtime profile '$PROFILE': choose current or debian12" ;; esac

system_mirror() {
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' || true
  } 2>/dev/null | grep -v -- '-security' | head -n 1 || true
}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(system_mirror)}
[ -n "$DEBIAN_MIRROR" ] || die "no Debian archive found in apt sources; set DEBIAN_MIRROR"

APT_PKGS=(runc containerd docker.io tini iptables busybox-static cpio
          protobuf-compiler libprotobuf-dev pkg-config libssl-dev sqlite3 libsqlite3-dev
          iproute2 ca-certificates gzip xz-utils zstd e2fsprogs fonts-dejavu-core python3-venv podman
          # deploy/install-node.sh checks that the release binary carries no DWARF
          binutils
          # a real server that drops privileges, packed into an image by tests/tests/nginx.rs
          nginx-light
          # a real server with state, moved by tests/benches/servers.rs (issue 21)
          redis-server
          # the web dashboard's e2e test (tests/tests/dashboard.rs): headless Chromium over WebDriver
          chromium chromium-driver
          # the capture test of issue 17 (tests/tests/capture.rs): no plaintext on the link
          tcpdump)
QEMU_PKGS=(qemu-system-x86 qemu-utils)

pkg_installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]; }
pkg_version()   { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
codename() { . /etc/os-release; echo "${VERSION_CODENAME:-unknown}"; }

# private apt config: own source list + own list dir, shares only the dpkg status
apt_priv_opts() {  # apt_priv_opts DIR SOURCEPARTS -> sets APT_OPTS
  local d=$1
  APT_OPTS=(-o "Dir::Etc::sourcelist=$d/sources.list" -o "Dir::Etc::sourceparts=$2"
            -o "Dir::State::Lists=$d/lists" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
            -o "Acquire::Languages=none" -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false")
}

# Package postinsts must not start services (there may be no init system).
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0
policy_rc_block() {
  if [ ! -e "$POLICY_RC" ]; then
    printf '#!/bin/sh\n# temporary, created by away deploy/install.sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"; POLICY_RC_OURS=1
  fi
}
policy_rc_restore() {
  if [ "$POLICY_RC_OURS" = 1 ] && grep -q 'created by away deploy/install.sh' "$POLICY_RC" 2>/dev/null; then
    rm -f "$POLICY_RC"; POLICY_RC_OURS=0
  fi
}
CHANGED=()   # steps that changed the machine; empty on a re-run
on_exit() {
  local rc=$?; policy_rc_restore; print_timings
  if [ $rc = 0 ]; then
    if [ ${#CHANGED[@]} = 0 ]; then log "nothing changed (everything was already installed)"
    else log "changed: ${CHANGED[*]}"; fi
  else warn "install failed (exit $rc)"; fi
}

install_apt_packages() {
  local missing=() p
  for p in "${APT_PKGS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
  # An installed qemu-utils >= 8 comes from bookworm-backports and Breaks bookworm's
  # qemu-system-common 7.2, so the missing qemu packages then come from backports too.
  local qemu_missing=() qemu_bpo=0 v
  for p in "${QEMU_PKGS[@]}"; do
    if pkg_installed "$p"; then
      v=$(pkg_version "$p"); dpkg --compare-versions "$v" ge 1:8 && qemu_bpo=1
    else
      qemu_missing+=("$p")
    fi
  done
  [ ${#qemu_missing[@]} -gt 0 ] || qemu_bpo=0
  [ $qemu_bpo = 1 ] || missing+=("${qemu_missing[@]}")
  if [ ${#missing[@]} -eq 0 ] && [ $qemu_bpo = 0 ]; then
    log "apt packages: all present"
    return 0
  fi
  CHANGED+=(apt-packages)
  policy_rc_block
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  if [ $qemu_bpo = 1 ]; then
    local rel; rel=$(codename)-backports
    log "qemu-utils $(pkg_version qemu-utils) is from backports -> ${qemu_missing[*]} from $rel"
    local d=$APT_PRIV/backports
    mkdir -p "$d/lists/partial"
    { [ -f /etc/apt/sources.list ] && cat /etc/apt/sources.list || true
      echo "deb $DEBIAN_MIRROR $rel main"; } >"$d/sources.list"
    apt_priv_opts "$d" /etc/apt/sources.list.d
    if apt-get "${APT_OPTS[@]}" update -q &&
       apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends -t "$rel" "${qemu_missing[@]}"; then
      :
    else
      warn "$rel install failed - falling back to $(codename) qemu (downgrades qemu-utils)"
      apt-get install -y -q --no-install-recommends --allow-downgrades \
        qemu-system-x86/"$(codename)" qemu-system-common/"$(codename)" qemu-system-data/"$(codename)" qemu-utils/"$(codename)"
    fi
  fi
  policy_rc_restore
}

CRIU_SUITE=${AWAY_CRIU_SUITE:-forky}
CRIU_MIN=4.2
# Patches away applies to CRIU's source (deploy/criu/*.patch), named with a hash of their
# content in the install marker so that a machine with an older build builds again.
CRIU_PATCHES=("$HERE"/criu/*.patch)
# What building `criu` needs; the runtime libraries come with their -dev packages.
CRIU_BUILD_PKGS=(gcc make libc6-dev pkg-config patch xz-utils protobuf-c-compiler libprotobuf-c-dev
                 libnl-3-dev libnet1-dev libcap-dev libbsd-dev libnftables-dev libgnutls28-dev uuid-dev)
criu_marker() {
  local p names=()
  for p in "${CRIU_PATCHES[@]}"; do names+=("$(basename "$p")@$(sha256sum "$p" | cut -c1-12)"); done
  echo "built from source, patches: ${names[*]}"
}
criu_ok() {
  [ -x "$CRIU_LINK" ] && [ -f "$CRIU_PREFIX/.away-installed" ] || return 1
  grep -qxF "$(criu_marker)" "$CRIU_PREFIX/.away-installed" || return 1
  local v; v=$("$CRIU_LINK" --version 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] && dpkg --compare-versions "$v" ge "$CRIU_MIN"
}

# CRIU from the source of Debian $CRIU_SUITE, built against bookworm's libraries with
# away's patches: CRIU 4.2.1 as released (Debian's binary included) leaves no page lazy now
# and then (see the patch), and a binary cannot be mended.
install_criu() {
  if criu_ok; then
    log "CRIU: $("$CRIU_LINK" --version | head -1) ($(tail -n 1 "$CRIU_PREFIX/.away-installed"))"
    return 0
  fi
  CHANGED+=(criu)
  apt-get install -y -q --no-install-recommends "${CRIU_BUILD_PKGS[@]}"
  local d=$APT_PRIV/$CRIU_SUITE-src
  mkdir -p "$d/lists/partial" "$d/sources.list.d"
  echo "deb-src $DEBIAN_MIRROR $CRIU_SUITE main" >"$d/sources.list"
  apt_priv_opts "$d" "$d/sources.list.d"
  apt-get "${APT_OPTS[@]}" update -q
  # only the upstream tarball: Debian's packaging is not needed to build the binary
  local uri name hash
  read -r uri name _ hash < <(apt-get "${APT_OPTS[@]}" source --print-uris -q criu | grep -E "^'.*\.orig\.tar\.[a-z0-9]+'" | head -n 1) ||
    die "no criu source package in $CRIU_SUITE at $DEBIAN_MIRROR"
  local tmp; tmp=$(mktemp -d /tmp/away-criu.XXXXXX)
  log "downloading $name ($CRIU_SUITE)"
  /usr/lib/apt/apt-helper -o APT::Sandbox::User=root download-file "${uri//\'/}" "$tmp/$name" "$hash" >/dev/null ||
    die "could not download ${uri//\'/}"
  tar -C "$tmp" -xf "$tmp/$name"
  local src; src=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)
  [ -f "$src/criu/mem.c" ] || die "$name holds no CRIU source tree"
  local p
  for p in "${CRIU_PATCHES[@]}"; do
    if patch -d "$src" -p1 --forward --silent <"$p"; then
      log "patched: $(basename "$p")"
    elif patch -d "$src" -p1 --reverse --dry-run --silent <"$p" >/dev/null; then
      log "already in this CRIU: $(basename "$p")"
    else
      die "$(basename "$p") does not apply to $name; see the patch's description"
    fi
  done
  log "building criu ($(nproc) jobs, about 20 s on 2 cores)"
  make -C "$src" -j"$(nproc)" criu >"$tmp/build.log" 2>&1 || { tail -n 30 "$tmp/build.log" >&2; die "building criu failed"; }
  local stage=$CRIU_PREFIX.new
  rm -rf "$stage"; mkdir -p "$stage/sbin"
  install -m 755 "$src/criu/criu" "$stage/sbin/criu"
  "$stage/sbin/criu" --version >/dev/null || die "the built criu does not run"
  { date -u +%FT%TZ; echo "CRIU from $name ($CRIU_SUITE)"; criu_marker; } >"$stage/.away-installed"
  rm -rf "$CRIU_PREFIX"; mv "$stage" "$CRIU_PREFIX"
  mkdir -p "$(dirname "$CRIU_LINK")"
  ln -sfn "$CRIU_PREFIX/sbin/criu" "$CRIU_LINK"
  rm -rf "$tmp"
  criu_ok || die "built $("$CRIU_LINK" --version | head -1) from $CRIU_SUITE, but away needs >= $CRIU_MIN"
  log "installed $("$CRIU_LINK" --version | head -1) -> $CRIU_LINK"
}

verify_criu() {
  local out
  out=$("$CRIU_LINK" check 2>&1) || { echo "$out" >&2; die "criu check failed"; }
  log "criu check: $(echo "$out" | tail -n 1)"
}

install_guest_kernel() {
  # disk modules (virtio_blk, ext4) came later: a guest dir without them is extracted again
  if [ -f "$GUEST_DIR/vmlinuz" ] && [ -f "$GUEST_DIR/VERSION" ] && [ -f "$GUEST_DIR/modules/.away-installed" ] &&
    [ -n "$(find "$GUEST_DIR/modules" -name 'virtio_blk.ko*' -print -quit)" ]; then
    log "guest kernel: $(cat "$GUEST_DIR/VERSION")"
    return 0
  fi
  CHANGED+=(guest-kernel)
  local pkg
  pkg=$( (apt-cache depends linux-image-amd64 2>/dev/null || true) | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -q
    pkg=$( (apt-cache depends linux-image-amd64 || true) | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64"
  local tmp; tmp=$(mktemp -d /tmp/away-kernel.XXXXXX)
  log "downloading $pkg (only vmlinuz is extracted; the package is not installed)"
  (cd "$tmp" && apt-get -o APT::Sandbox::User=root download -q "$pkg")
  # vmlinuz, and the modules the VM init loads: Debian builds virtio-net as a module; a VM
  # with a disk also loads virtio_blk and ext4 (with jbd2, mbcache, crc16, crc32c)
  dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -C "$tmp" -xf - --wildcards './boot/vmlinuz-*' './boot/config-*' \
    './lib/modules/*/kernel/drivers/virtio/*.ko' './lib/modules/*/kernel/drivers/net/virtio_net.ko' \
    './lib/modules/*/kernel/drivers/net/net_failover.ko' './lib/modules/*/kernel/net/core/failover.ko' \
    './lib/modules/*/kernel/drivers/block/virtio_blk.ko' './lib/modules/*/kernel/fs/ext4/ext4.ko' \
    './lib/modules/*/kernel/fs/jbd2/jbd2.ko' './lib/modules/*/kernel/fs/mbcache.ko' \
    './lib/modules/*/kernel/lib/crc16.ko' './lib/modules/*/kernel/crypto/crc32c_generic.ko'
  mkdir -p "$GUEST_DIR"
  rm -rf "$GUEST_DIR/modules"; mkdir -p "$GUEST_DIR/modules"
  cp -a "$tmp"/lib/modules/*/kernel "$GUEST_DIR/modules/"
  date -u +%FT%TZ >"$GUEST_DIR/modules/.away-installed"
  local vmlinuz; vmlinuz=$(ls "$tmp"/boot/vmlinuz-*)
  cp "$vmlinuz" "$GUEST_DIR/$(basename "$vmlinuz")"
  cp "$tmp"/boot/config-* "$GUEST_DIR/"
  ln -sfn "$(basename "$vmlinuz")" "$GUEST_DIR/vmlinuz"
  echo "$pkg $(dpkg-deb -f "$tmp"/*.deb Version)" >"$GUEST_DIR/VERSION"
  rm -rf "$tmp"
  log "guest kernel: $GUEST_DIR/vmlinuz -> $(basename "$vmlinuz")"
}

# schemathesis fuzzes the broker's API against its OpenAPI document (tests/schemathesis.sh).
# It lives in its own virtual environment: Debian's Python refuses global pip installs
# (PEP 668), and a venv keeps its dependencies from shadowing Debian's Python packages.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=/opt/away-schemathesis
install_schemathesis() {
  local have
  have=$("$SCHEMATHESIS_VENV/bin/python" -m pip show schemathesis 2>/dev/null | awk '/^Version:/ {print $2}' || true)
  if [ "$have" = "$SCHEMATHESIS_VERSION" ]; then
    log "schemathesis: $have ($SCHEMATHESIS_VENV)"
    return 0
  fi
  CHANGED+=(schemathesis)
  # Debian's own Python (python3-venv from the apt step), whatever python3 is first on PATH
  [ -x "$SCHEMATHESIS_VENV/bin/python" ] || /usr/bin/python3 -m venv "$SCHEMATHESIS_VENV" ||
    die "cannot create a Python venv in $SCHEMATHESIS_VENV (python3-venv missing?)"
  "$SCHEMATHESIS_VENV/bin/python" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" ||
    die "pip could not install schemathesis==$SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
  log "schemathesis: $SCHEMATHESIS_VERSION ($SCHEMATHESIS_VENV)"
}

# --- runtime profiles (docs/runtimes.md) -------------------------------------------------
RUNTIME_SUITE=${AWAY_RUNTIME_SUITE:-forky}
# What the current profile takes from $RUNTIME_SUITE: containerd (with its shim and ctr),
# dockerd + docker-proxy, the docker CLI. docker-init is Debian 12's tini-static.
CURRENT_PKGS=(containerd docker.io docker-cli)
# runc candidates, newest line first: the first whose binary runs here wins (forky's 1.3
# and trixie's 1.1.15 are built against glibc 2.38; Debian 12 has 2.36).
RUNC_SUITES=(forky trixie)

# runtime_apt SUITE -> APT_OPTS for a private apt config with that binary suite
runtime_apt() {
  local d=$APT_PRIV/runtimes-$1
  mkdir -p "$d/lists/partial" "$d/sources.list.d"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR $1 main" >"$d/sources.list"
  apt_priv_opts "$d" "$d/sources.list.d"
  APT_OPTS+=(-o APT::Sandbox::User=root)
  # apt checks the index's signature; `download` then checks each package against it
  case " ${RUNTIME_APT_READ:-} " in *" $1 "*) return 0 ;; esac
  apt-get "${APT_OPTS[@]}" update -q >/dev/null || die "apt could not read $1 at $DEBIAN_MIRROR"
  RUNTIME_APT_READ="${RUNTIME_APT_READ:-} $1"
}

# profile_link NAME TARGET: a binary of the profile being built
profile_link() { ln -sfn "$2" "$STAGE/bin/$1"; }

profile_marker() {  # what a complete profile records; a different one means: build again
  case $1 in
    current) echo "suite=$RUNTIME_SUITE pkgs=${CURRENT_PKGS[*]} layout=1" ;;
    debian12) echo "system packages layout=1" ;;
  esac
}
profile_ok() { [ -f "$RUNTIMES_DIR/$1/.away-installed" ] && grep -qxF "$(profile_marker "$1")" "$RUNTIMES_DIR/$1/.away-installed"; }

build_debian12_profile() {
  local b
  for b in containerd containerd-shim-runc-v2 ctr; do profile_link "$b" "/usr/bin/$b"; done
  for b in runc dockerd docker-proxy; do profile_link "$b" "/usr/sbin/$b"; done
  profile_link docker-init /usr/bin/tini-static
  profile_link docker /usr/bin/docker
  # Debian 12's packages keep their state where they put it
  if [ -f /etc/containerd/config.toml ]; then
    printf '%s\n' "--config" "/etc/containerd/config.toml" >"$STAGE/containerd.flags"
  else
    : >"$STAGE/containerd.flags"
  fi
  : >"$STAGE/dockerd.flags"
  for b in containerd docker.io runc; do echo "$b $(pkg_version "$b") (Debian 12)"; done >"$STAGE/PACKAGES"
}

build_current_profile() {
  local tmp; tmp=$(mktemp -d /tmp/away-runtimes.XXXXXX)
  runtime_apt "$RUNTIME_SUITE"
  log "downloading ${CURRENT_PKGS[*]} from $RUNTIME_SUITE"
  (cd "$tmp" && apt-get "${APT_OPTS[@]}" download -q "${CURRENT_PKGS[@]}" >/dev/null) ||
    die "could not download ${CURRENT_PKGS[*]} from $RUNTIME_SUITE"
  local f b
  for f in "$tmp"/*.deb; do dpkg-deb -x "$f" "$tmp/root"; done
  for b in usr/bin/containerd usr/bin/containerd-shim-runc-v2 usr/bin/ctr usr/sbin/dockerd usr/sbin/docker-proxy usr/bin/docker; do
    [ -x "$tmp/root/$b" ] || die "$RUNTIME_SUITE's packages have no $b"
    install -m 755 "$tmp/root/$b" "$STAGE/bin/"
  done
  for b in containerd dockerd docker; do
    "$STAGE/bin/$b" --version >/dev/null 2>"$tmp/err" ||
      die "$b from $RUNTIME_SUITE does not run on this system: $(head -c 300 "$tmp/err")"
  done
  profile_link docker-init /usr/bin/tini-static
  { for f in "$tmp"/*.deb; do dpkg-deb -W --showformat='${Package} ${Version}\n' "$f"; done; } >"$STAGE/PACKAGES"
  install_newest_runc "$tmp"
  # Own state directories: containerd 2 and Docker 28 migrate their stores forward, and
  # Debian 12's daemons must not meet a store a newer version has rewritten.
  local state=/var/lib/away-runtimes/current
  cat >"$STAGE/containerd.toml" <<EOF
# containerd of away's "current" runtime profile (written by deploy/install.sh).
# version 2 is read by containerd 1.6 and 2.x alike (2.x migrates it in memory).
version = 2
root = "$state/containerd"
state = "/run/containerd"
# Kubernetes' CRI plugin serves nothing away uses
disabled_plugins = ["io.containerd.grpc.v1.cri"]
EOF
  printf '%s\n' "--config" "$RUNTIMES_DIR/current/containerd.toml" >"$STAGE/containerd.flags"
  printf '%s\n' "--data-root" "$state/docker" >"$STAGE/dockerd.flags"
  rm -rf "$tmp"
}

install_newest_runc() {  # into $STAGE/bin/runc: the newest candidate that runs here
  local tmp=$1 s deb out
  for s in "${RUNC_SUITES[@]}"; do
    runtime_apt "$s"
    rm -rf "$tmp/runc"; mkdir -p "$tmp/runc"
    if ! (cd "$tmp/runc" && apt-get "${APT_OPTS[@]}" download -q runc >/dev/null 2>&1); then
      warn "no runc package in $s"; continue
    fi
    deb=$(ls "$tmp"/runc/runc_*.deb)
    dpkg-deb -x "$deb" "$tmp/runc/root"
    if out=$("$tmp/runc/root/usr/sbin/runc" --version 2>&1); then
      install -m 755 "$tmp/runc/root/usr/sbin/runc" "$STAGE/bin/runc"
      log "runc: $(echo "$out" | head -n 1) from $s"
      dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$STAGE/PACKAGES"
      return 0
    fi
    log "runc $(dpkg-deb -f "$deb" Version) from $s does not run here: $(echo "$out" | grep -o "GLIBC_[0-9.]*' not found" | head -n 1)"
  done
  /usr/sbin/runc --version >/dev/null 2>&1 || die "no runc runs on this system"
  log "runc: Debian 12's $(pkg_version runc), the newest whose package runs on glibc $(ldd --version | awk 'NR==1 {print $NF}')"
  profile_link runc /usr/sbin/runc
  echo "runc $(pkg_version runc) (Debian 12)" >>"$STAGE/PACKAGES"
}

install_runtime_profile() {
  if ! profile_ok "$PROFILE"; then
    CHANGED+=("runtimes-$PROFILE")
    STAGE=$RUNTIMES_DIR/$PROFILE.new
    rm -rf "$STAGE"; mkdir -p "$STAGE/bin"
    "build_${PROFILE}_profile"
    profile_marker "$PROFILE" >"$STAGE/.away-installed"
    rm -rf "${RUNTIMES_DIR:?}/$PROFILE"; mv "$STAGE" "$RUNTIMES_DIR/$PROFILE"
  fi
  if [ "$(active_profile)" != "$PROFILE" ]; then
    CHANGED+=("active-profile")
    ln -sfn "$PROFILE" "$RT_ACTIVE.new" && mv -T "$RT_ACTIVE.new" "$RT_ACTIVE"
    log "active runtime profile: $PROFILE (daemons already running keep their version until: deploy/services.sh restart)"
  fi
  log "runtimes ($PROFILE): $(paste -sd, "$RT_ACTIVE/PACKAGES" | sed 's/,/, /g')"
}

check_toolchain() {
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found; Debian bookworm's rustc (1.63) is too old for away - install a rustup toolchain (1.80+)"
  log "rust: $(rustc --version), protoc: $(protoc --version)"
}

need_root
trap on_exit EXIT
[ "$(codename)" = bookworm ] || warn "tested on Debian 12 (bookworm) only; this is $(codename)"
step apt-packages install_apt_packages
step criu install_criu
step criu-check verify_criu
step guest-kernel install_guest_kernel
step runtimes install_runtime_profile
step toolchain check_toolchain
step schemathesis install_schemathesis
