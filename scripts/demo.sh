#!/usr/bin/env bash
# The main job on the local emulator, start to end: build a demo disk (GPT + ext4),
# serve it as an EBS snapshot, mount it with ebsfs, loop mount its partition read-only
# and show what is inside. Leaves everything up for you to explore;
# `bash scripts/demo.sh cleanup` takes it all down. Needs root (losetup, mount).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="${EBSFS_DEMO_DIR:-/tmp/ebsfs-demo}"
SNAP=snap-0123456789abcdef0
IMG="$DEMO/mnt/$SNAP.img"
PART="$DEMO/mnt/$SNAP-part1.img"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-demo}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-demo}"
export AWS_REGION="${AWS_REGION:-us-east-1}"

cleanup() {
    if mountpoint -q "$DEMO/fs" 2>/dev/null; then umount "$DEMO/fs"; fi
    if [ -f "$DEMO/loopdev" ]; then losetup -d "$(cat "$DEMO/loopdev")" 2>/dev/null || true; rm -f "$DEMO/loopdev"; fi
    if mountpoint -q "$DEMO/mnt" 2>/dev/null; then
        .venv/bin/ebsfs umount "$DEMO/mnt" || fusermount3 -u -z "$DEMO/mnt" || true
    fi
    if [ -f "$DEMO/emulator.pid" ]; then
        pid="$(cat "$DEMO/emulator.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$DEMO/emulator.pid"
    fi
}

if [ "${1:-}" = cleanup ]; then
    cleanup
    rm -rf "$DEMO"
    echo "demo: cleaned up"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it uses losetup and mount)" >&2; exit 1; }

bash scripts/setup.sh
cleanup
mkdir -p "$DEMO/mnt" "$DEMO/fs"
echo "== building a 64 MiB demo disk (GPT, ext4 partition at 1 MiB)"
.venv/bin/python -m ebsfs.emulator.diskimage "$DEMO/disk.img" 64

echo "== starting the local EBS direct API emulator"
rm -f "$DEMO/url"
nohup .venv/bin/ebsfs-emulator --snapshot "$SNAP=$DEMO/disk.img" --latency 0.005 \
    --url-file "$DEMO/url" >"$DEMO/emulator.log" 2>&1 &
echo $! >"$DEMO/emulator.pid"
for _ in $(seq 100); do [ -s "$DEMO/url" ] && break; sleep 0.1; done
[ -s "$DEMO/url" ] || { cat "$DEMO/emulator.log"; echo "demo: emulator did not start" >&2; exit 1; }
URL="$(cat "$DEMO/url")"
echo "   $URL serves $SNAP"

echo "== ebsfs mount --endpoint-url $URL --ec2-endpoint-url $URL $SNAP $DEMO/mnt   (the emulator answers EC2 too: the image times are the snapshot's)"
.venv/bin/ebsfs mount --endpoint-url "$URL" --ec2-endpoint-url "$URL" --log-file "$DEMO/ebsfs.log" "$SNAP" "$DEMO/mnt"
ls -l "$DEMO/mnt"

echo "== the partition table, read straight from the image (sleuthkit mmls)"
mmls "$IMG" || true

echo "== loop mounting the ext4 partition file read-only (no offset needed)"
LOOP="$(losetup -r --show -f "$PART")"
echo "$LOOP" >"$DEMO/loopdev"
mount -o ro,noload "$LOOP" "$DEMO/fs"
echo "   $LOOP ($PART) on $DEMO/fs"
(cd "$DEMO/fs" && find . -path ./lost+found -prune -o -type f -printf '%10s  %p\n' | sort -k2)
echo "== $DEMO/fs/etc/hostname: $(cat "$DEMO/fs/etc/hostname")"
echo "== last lines of var/log/auth.log:"
tail -n 3 "$DEMO/fs/var/log/auth.log"
STATS="$(curl -s "$URL/_emulator/stats" 2>/dev/null || .venv/bin/python -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())" "$URL/_emulator/stats")"
.venv/bin/python - "$STATS" <<'PY'
import json, sys
stats = json.loads(sys.argv[1])
gets = sum(stats["block_gets"].values())
print(f"== ebsfs fetched {gets} of the snapshot's 2048 blocks (1 GiB volume) to show you this "
      f"({stats['bytes_sent'] / 2**20:.1f} MiB), with {stats['calls'].get('ListSnapshotBlocks', 0)} list calls")
PY
cat <<EOT

Explore:
  ls -R $DEMO/fs
      the files of the snapshot's filesystem
  fls -r $PART
      sleuthkit, straight on the partition file (icat $PART INODE prints a file)
  sha256sum $IMG
      reads the whole 1 GiB image (never-written blocks are zeros and cost no call)
  tail -f $DEMO/ebsfs.log
      what ebsfs is doing (mount with -v for more)
Clean up:
  bash scripts/demo.sh cleanup
EOT
