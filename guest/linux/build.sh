#!/usr/bin/env bash
# Build the ftvmm Linux guest from Debian packages, nothing downloaded but
# them: a Linux 6.1 kernel (Debian's linux-source-6.1, `make tinyconfig` plus
# guest/linux/kernel.config) and uncompressed cpio initramfs images
# (busybox-static and guest/linux/init; the "redis" one adds redis-server
# and the libraries ldd names).
#
# Output, under target/linux/ of the repository:
#   vmlinux               PVH ELF kernel (ftvmm run --kernel)
#   initramfs.cpio        busybox + /init
#   initramfs-redis.cpio  the same plus redis-server
# Each part is rebuilt only when its inputs changed (a stamp holds their hash).
# Usage: bash guest/linux/build.sh [--force]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${FTVMM_LINUX_OUT:-$repo/target/linux}"
jobs="${FTVMM_LINUX_JOBS:-2}"
force=0
[ "${1:-}" = "--force" ] && force=1

say() { printf 'linux-guest: %s (%s)\n' "$*" "$(date +%T)"; }
die() { printf 'linux-guest: error: %s\n' "$*" >&2; exit 1; }

# --- packages -------------------------------------------------------------
packages=(linux-source-6.1 busybox-static redis-server
  build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils
  python3 rsync)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  [ "$(id -u)" = 0 ] || die "packages missing (${missing[*]}) and not root to install them"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
version() { dpkg-query -W -f='${Package}=${Version}\n' "$1"; }

mkdir -p "$out"
hash_of() { sha256sum | cut -c1-64; }
stamp_ok() { [ $force = 0 ] && [ -f "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3" ]; }

# --- kernel ---------------------------------------------------------------
tarball=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
[ -n "$tarball" ] || die "/usr/src/linux-source-6.1.tar.xz not found (package linux-source-6.1)"
kernel_hash=$( {
  version linux-source-6.1
  cat "$here/kernel.config"
  sed -n '/^# --- kernel/,/^# --- initramfs/p' "$0"
} | hash_of)
src="$out/linux-source-6.1"
build="$out/build"
if stamp_ok "$out/vmlinux" "$out/vmlinux.stamp" "$kernel_hash"; then
  say "kernel up to date ($out/vmlinux)"
else
  start=$SECONDS
  if [ ! -f "$src/.ftvmm-source" ] || [ "$(cat "$src/.ftvmm-source")" != "$(version linux-source-6.1)" ]; then
    say "unpacking $tarball"
    rm -rf "$src"
    tar -C "$out" -xf "$tarball"
    version linux-source-6.1 >"$src/.ftvmm-source"
  fi
  rm -rf "$build"
  mkdir -p "$build"
  say "configuring: tinyconfig + guest/linux/kernel.config"
  make -s -C "$src" O="$build" tinyconfig >/dev/null
  (cd "$build" && "$src/scripts/kconfig/merge_config.sh" -m -O "$build" .config "$here/kernel.config" >/dev/null)
  make -s -C "$src" O="$build" olddefconfig >/dev/null
  # Every option the fragment sets must have survived olddefconfig.
  while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*) grep -qx "$line" "$build/.config" || die "kernel.config: '$line' did not stick (a dependency is missing)" ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      if grep -q "^$opt=" "$build/.config"; then
        say "note: $opt is forced on by another option"
      fi ;;
    esac
  done <"$here/kernel.config"
  say "building vmlinux (make -j$jobs, nice 10; about 3 minutes on 2 cores)"
  nice -n 10 make -s -C "$src" O="$build" -j"$jobs" KBUILD_BUILD_TIMESTAMP=@0 \
    KBUILD_BUILD_USER=ftvmm KBUILD_BUILD_HOST=ftvmm vmlinux
  cp "$build/vmlinux" "$out/vmlinux.tmp"
  mv "$out/vmlinux.tmp" "$out/vmlinux"
  echo "$kernel_hash" >"$out/vmlinux.stamp"
  say "kernel built in $((SECONDS - start)) s: $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
fi

# --- initramfs ------------------------------------------------------------
# The kernel's own cpio writer: device nodes without root, fixed mtimes.
gen="$out/gen_init_cpio"
if [ ! -x "$gen" ] || [ "$src/usr/gen_init_cpio.c" -nt "$gen" ]; then
  cc -O2 -o "$gen" "$src/usr/gen_init_cpio.c"
fi
busybox=/bin/busybox
redis=/usr/bin/redis-server
redis_libs() { ldd "$redis" | awk '/=> \//{print $3} /^\t\/lib/{print $1}'; }

# A gen_init_cpio list: busybox with its applets as links, /init, and the
# directories and nodes init needs.
base_list() {
  cat <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 01777 0 0
dir /root 0700 0 0
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /usr 0755 0 0
dir /usr/bin 0755 0 0
dir /usr/sbin 0755 0 0
file /bin/busybox $busybox 0755 0 0
file /init $here/init 0755 0 0
LIST
  "$busybox" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] || echo "slink /$applet /bin/busybox 0777 0 0"
  done
}

redis_list() {
  echo "dir /lib 0755 0 0"
  echo "dir /lib/x86_64-linux-gnu 0755 0 0"
  echo "dir /lib64 0755 0 0"
  echo "dir /etc 0755 0 0"
  echo "file /usr/bin/redis-server $redis 0755 0 0"
  for lib in $(redis_libs); do
    # /lib64/ld-linux-x86-64.so.2 and /lib/x86_64-linux-gnu/*: the real file
    # under the name the binary asks for.
    echo "file $lib $(readlink -f "$lib") 0755 0 0"
  done
}

build_cpio() { # name, list function...
  local name=$1
  shift
  local list="$out/$name.list"
  { for f in "$@"; do "$f"; done; } >"$list"
  local h
  h=$( {
    cat "$list"
    cat "$here/init"
    sed -n '/^# --- initramfs/,$p' "$0"
    version busybox-static
    version redis-server
    # The files themselves (libraries come from many packages).
    awk '$1 == "file" {print $3}' "$list" | sort -u | xargs sha256sum
  } | hash_of)
  if stamp_ok "$out/$name" "$out/$name.stamp" "$h"; then
    say "$name up to date"
    return
  fi
  "$gen" -t 0 "$list" >"$out/$name.tmp"
  mv "$out/$name.tmp" "$out/$name"
  echo "$h" >"$out/$name.stamp"
  say "$name built: $(stat -c %s "$out/$name") bytes"
}

[ -x "$busybox" ] || die "$busybox not found (package busybox-static)"
"$busybox" --list-full >/dev/null || die "$busybox has no --list-full"
build_cpio initramfs.cpio base_list
build_cpio initramfs-redis.cpio base_list redis_list
say "done: $out/vmlinux, $out/initramfs.cpio, $out/initramfs-redis.cpio"
