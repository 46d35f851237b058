"""Generate Backpack.tf-shaped event frames for the relay benchmark.

Each frame is the text of one websocket text frame as the Backpack.tf events
feed sends it: a JSON array of ``{"id", "event", "payload"}`` events, where the
payload is a classifieds listing. The generator matches the feed's size
profile: batches of 1 to 40 events (about 2.1 KB each, median frame about
10 KB) and a 501-event batch of about 1 MB at every frame index ``i`` with
``i % 60 == 59``. Strings carry non-ASCII text (emoji, CJK, mathematical
letters) as real listings do. Output depends only on the seed and the count.

Usage::

    python bench/gen_frames.py --count 300 --seed 1 -o frames.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

# Frame sizes: every LARGE_BATCH_PERIOD-th frame is a LARGE_BATCH_EVENTS batch.
LARGE_BATCH_PERIOD = 60
LARGE_BATCH_EVENTS = 501
SMALL_BATCH_SIZES = (1, 2, 3, 5, 8, 13, 21, 40)
SMALL_BATCH_WEIGHTS = (67, 34, 29, 31, 35, 32, 36, 31)

# Listing times are fixed so that output does not depend on the clock.
BASE_TIME = 1764800000

# The benchmark's fake upstream writes a sequence number into the first event's
# id, so every frame must start with an ObjectId at a fixed offset.
FRAME_PREFIX = re.compile(rb'^\[\{"id":"[0-9a-f]{24}"')

DETAILS = (
    "cheap cheap, fast accept",
    "⚡🗝️⚡🔥 𝟰𝟬𝟬 𝗞𝗙𝟮 𝗸𝗲𝘆𝘀 🔥⚡🗝️⚡\n𝐅𝐥𝐨𝐚𝐭: 𝟎.𝟎𝟎𝟖𝟖",
    "Buying for {price}! Can pay more in certain cases, just contact my owner! 王 ",
    "{name} | {price} pure or mixed/items overpay. Add me to negotiate. "
    "I'll accept as fast as possible.",
    "24/7 自動取引ボット ⇄ send an offer, no trade holds please ✅",
    "Ｓｅｌｌｉｎｇ ｆａｓｔ ✦ {price} ✦ offers only, no lowballs 🙏",
    "Быстрый обмен, {price}, пишите в профиль 💬",
)

USER_NAME_PATTERNS = (
    "keys4all {n}",
    "Bot {n} | 24/7 ⇄",
    "王 shop {n}",
    "scrap-{n} 🔥",
    "trader-{n}",
    "ＬＵＣＫＹ {n} ☘",
)

TF2_ITEMS = (
    {
        "baseName": "Lord Cockswain's Pith Helmet",
        "defindex": 439,
        "quality": (5, "Unusual", "#8650AC"),
        "slot": "misc",
        "class": ["Soldier"],
        "icon": "drg_pith_hat",
        "particle": (62, "Disco Beat Down", "dbd"),
    },
    {
        "baseName": "Anger",
        "defindex": 518,
        "quality": (1, "Genuine", "#4D7455"),
        "slot": "misc",
        "class": ["Sniper"],
        "icon": "c_bet_brinkhood",
        "spell": "Voices from Below",
    },
    {
        "baseName": "Shotgun",
        "defindex": 10,
        "quality": (11, "Strange", "#CF6A32"),
        "slot": "secondary",
        "class": ["Soldier", "Pyro", "Heavy", "Engineer"],
        "icon": "w_shotgun",
        "texture": (60, "Autumn"),
    },
    {
        "baseName": "Team Captain",
        "defindex": 378,
        "quality": (5, "Unusual", "#8650AC"),
        "slot": "misc",
        "class": ["Scout", "Soldier", "Pyro", "Demoman", "Heavy"],
        "icon": "all_captain_hat",
        "particle": (13, "Burning Flames", "bf"),
    },
    {
        "baseName": "Mann Co. Supply Crate Key",
        "defindex": 5021,
        "quality": (6, "Unique", "#FFD700"),
        "slot": "misc",
        "class": [],
        "icon": "key",
    },
)

CS_ITEMS = (
    ("Desert Eagle", "Blaze", "Restricted Pistol", (4, "Remarkable", "#8847FF")),
    ("AK-47", "Redline", "Classified Rifle", (5, "Exotic", "#D32CE6")),
    ("AWP", "Asiimov", "Covert Sniper Rifle", (6, "Extraordinary", "#EB4B4B")),
    ("★ Karambit", "Doppler", "Covert Knife", (6, "Extraordinary", "#EB4B4B")),
)

WEAR_TIERS = (
    (1, "Factory New", "FN"),
    (2, "Minimal Wear", "MW"),
    (3, "Field-Tested", "FT"),
    (4, "Well-Worn", "WW"),
    (5, "Battle-Scarred", "BS"),
)


def _hex(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(digits))


def _object_id(rng: random.Random, seconds: int) -> str:
    """Return a MongoDB ObjectId string: 8 hex digits of time, then 16 more."""
    return f"{seconds:08x}{_hex(rng, 16)}"


def _user(rng: random.Random, steamid: str, number: int) -> dict:
    name = rng.choice(USER_NAME_PATTERNS).format(n=number)
    premium = rng.random() < 0.4
    style = rng.choice(("", "premium", "awesome1", "awesome5")) if premium else ""
    avatar = (
        "https://avatars.akamai.steamstatic.com/"
        f"{number:040d}"
    )
    return {
        "id": steamid,
        "name": name,
        "avatar": f"{avatar}_medium.jpg",
        "avatarFull": f"{avatar}_full.jpg",
        "premium": premium,
        "online": rng.random() < 0.8,
        "banned": False,
        "customNameStyle": style,
        "acceptedSuggestions": rng.randrange(0, 40),
        "class": style,
        "style": "",
        "role": None,
        "tradeOfferUrl": (
            "https://steamcommunity.com/tradeoffer/new/"
            f"?partner={rng.randrange(10**8, 10**9)}&token={_hex(rng, 8)}"
        ),
        "isMarketplaceSeller": False,
        "flagImpersonated": None,
        "bans": [],
    }


def _tf2_item(rng: random.Random, asset_id: str, keys: int) -> dict:
    template = rng.choice(TF2_ITEMS)
    quality_id, quality_name, quality_color = template["quality"]
    base_name = template["baseName"]
    level = rng.randrange(1, 101)
    ref = round(keys * 65.4 + rng.random() * 10, 2)
    item = {
        "appid": 440,
        "baseName": base_name,
        "defindex": template["defindex"],
        "id": asset_id,
        "imageUrl": (
            f"https://steamcdn-a.akamaihd.net/apps/440/icons/{template['icon']}."
            f"{_hex(rng, 40)}.png"
        ),
        "marketName": f"{quality_name} {base_name}",
        "name": f"{quality_name} {base_name}",
        "origin": rng.choice(
            ({"id": 8, "name": "Found in Crate"}, {"id": 13, "name": "Steam Purchase"})
        ),
        "originalId": str(rng.randrange(10**9, 10**10)),
        "price": {
            "steam": {
                "currency": "usd",
                "short": f"${keys * 1.7:.2f}",
                "long": f"{ref:,} ref, {keys} keys",
                "raw": ref,
                "value": int(keys * 170),
            },
            "community": {
                "value": keys,
                "valueHigh": keys + rng.randrange(0, 5),
                "currency": "keys",
                "raw": ref,
                "short": f"{keys}–{keys + 2} keys",
                "long": f"{ref:,} ref, ${keys * 1.6:.2f}",
                "usd": round(keys * 1.6, 5),
                "updatedAt": BASE_TIME - rng.randrange(0, 10**8),
                "difference": round(rng.uniform(-300, 300), 12),
            },
            "suggested": {
                "raw": ref,
                "short": f"{keys} keys",
                "long": f"{ref:,} ref, ${keys * 1.6:.2f}",
                "usd": round(keys * 1.6, 5),
            },
        },
        "quality": {"id": quality_id, "name": quality_name, "color": quality_color},
        "summary": f"Level {level} {template['slot'].title()}",
        "level": level,
        "class": template["class"],
        "slot": template["slot"],
        "tradable": True,
        "craftable": rng.random() < 0.9,
        "tag": None,
    }
    if "particle" in template:
        particle_id, particle_name, short = template["particle"]
        item["name"] = f"{particle_name} {base_name}"
        item["particle"] = {
            "id": particle_id,
            "name": particle_name,
            "shortName": short,
            "imageUrl": f"/images/440/particles/{particle_id}_94x94.png",
            "type": "standard",
        }
        item["priceindex"] = str(particle_id)
    if "spell" in template:
        item["spells"] = [
            {
                "id": "standard-SPELL: Halloween voice modulation",
                "spellId": "SPELL: Halloween voice modulation",
                "name": template["spell"],
                "type": "standard",
            }
        ]
        item["paint"] = {"id": 5051, "name": "Pink as Hell", "color": "#ff69b4"}
        item["paintSecondaryHex"] = "#ff69b4"
    if "texture" in template:
        texture_id, texture_name = template["texture"]
        wear_id, wear_name, wear_short = rng.choice(WEAR_TIERS)
        item["name"] = f"{quality_name} {texture_name} {base_name} ({wear_name})"
        item["marketName"] = item["name"]
        item["texture"] = {
            "id": texture_id,
            "itemDefindex": 15085,
            "rarity": {"id": 1, "name": "Civilian", "color": "#B0C3D9"},
            "name": texture_name,
        }
        item["wearTier"] = {"id": wear_id, "name": wear_name, "short": wear_short}
    return item


def _cs_item(rng: random.Random, asset_id: str, usd: float) -> dict:
    weapon, skin, summary, rarity = rng.choice(CS_ITEMS)
    wear_id, wear_name, wear_short = rng.choice(WEAR_TIERS)
    name = f"{weapon} | {skin} ({wear_name})"
    return {
        "appid": 730,
        "baseName": None,
        "defindex": None,
        "id": asset_id,
        "imageUrl": (
            "https://steamcommunity-a.akamaihd.net/economy/image/"
            f"-9a81dlWLwJ2UUGcVs_nsVtzdOEdtWwKGZZLQHTxDZ7I56KU0Zwwo4NUX4oFJZEHLbXH5A"
            f"{_hex(rng, 120)}/168fx140f"
        ),
        "marketName": name,
        "name": name,
        "origin": None,
        "originalId": "",
        "price": {
            "steam": {
                "currency": "usd",
                "short": f"${usd:.2f}",
                "long": "",
                "raw": usd,
                "value": int(usd * 100),
            },
            "suggested": {
                "raw": usd,
                "short": f"{usd:.2f} keys",
                "long": "$0.00",
                "usd": 0,
            },
        },
        "quality": None,
        "summary": summary,
        "wearTier": {"id": wear_id, "name": wear_name, "short": wear_short},
        "tradable": True,
        "craftable": True,
        "rarity": {"id": rarity[0], "name": rarity[1], "color": rarity[2]},
    }


def _listing(rng: random.Random, seconds: int, user_number: int) -> dict:
    appid = 440 if rng.random() < 0.74 else 730
    intent = rng.choice(("buy", "sell"))
    steamid = str(76561190000000000 + rng.randrange(10**9))
    asset_id = str(rng.randrange(10**10, 10**11))
    if appid == 440:
        keys = rng.randrange(1, 25)
        item = _tf2_item(rng, asset_id if intent == "sell" else "", keys)
        currencies: dict = {"keys": keys}
        if rng.random() < 0.3:
            currencies["metal"] = round(rng.uniform(0.11, 60), 2)
        value_raw = round(keys * 65.4 + currencies.get("metal", 0), 2)
        value = {"raw": value_raw, "short": f"{keys} keys", "long": f"{keys} keys"}
        price_text = f"{keys} keys"
    else:
        usd = round(rng.uniform(2, 2500), 2)
        item = _cs_item(rng, asset_id, usd)
        currencies = {"usd": usd}
        value = {"raw": usd, "short": f"${usd:.2f}", "long": f"{usd} $USD"}
        price_text = f"${usd:.2f}"

    listing_id = (
        f"{appid}_{asset_id}" if intent == "sell" else f"{appid}_{steamid}_{_hex(rng, 32)}"
    )
    details = rng.choice(DETAILS).format(name=item["name"], price=price_text)
    listing = {
        "id": listing_id,
        "steamid": steamid,
        "appid": appid,
        "currencies": currencies,
        "value": value,
        "tradeOffersPreferred": rng.random() < 0.8,
        "buyoutOnly": rng.random() < 0.7,
        "details": details,
        "listedAt": seconds - rng.randrange(0, 3 * 10**6),
        "bumpedAt": seconds,
        "intent": intent,
        "count": 1,
        "status": "active",
        "source": "user",
        "item": item,
    }

    if rng.random() < 0.25:
        listing["promoted"] = True
    if rng.random() < 0.25:
        listing["source"] = "userAgent"
        listing["userAgent"] = {
            "client": "ExampleBot - automated trading",
            "lastPulse": seconds - rng.randrange(0, 300),
        }
    listing["user"] = _user(rng, steamid, user_number)
    return listing


def _batch_size(rng: random.Random, index: int) -> int:
    if index % LARGE_BATCH_PERIOD == LARGE_BATCH_PERIOD - 1:
        return LARGE_BATCH_EVENTS
    return rng.choices(SMALL_BATCH_SIZES, SMALL_BATCH_WEIGHTS)[0]


def generate_frames(count: int, seed: int = 1) -> list[bytes]:
    """Generate ``count`` frames as UTF-8 bytes, the same for the same seed."""
    rng = random.Random(seed)
    frames = []
    event_number = 0
    for index in range(count):
        seconds = BASE_TIME + index // 20
        events = []
        for _ in range(_batch_size(rng, index)):
            event_number += 1
            events.append(
                {
                    "id": _object_id(rng, seconds),
                    "event": "listing-update" if rng.random() < 0.69 else "listing-delete",
                    "payload": _listing(rng, seconds, event_number),
                }
            )
        text = json.dumps(events, ensure_ascii=False, separators=(",", ":"))
        frames.append(text.encode("utf-8"))
    return frames


def read_frames(path: Path) -> list[bytes]:
    """Read a JSON Lines file of frames, one frame's exact text per line.

    Raises:
        ValueError: if the file has no frames, or a frame does not start with
            an event whose id is a 24-hex-digit ObjectId.
    """
    frames = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    if not frames:
        raise ValueError(f"{path}: no frames found")
    for number, frame in enumerate(frames, start=1):
        if not FRAME_PREFIX.match(frame):
            raise ValueError(
                f'{path}:{number}: frame must start with [{{"id":"<24 hex digits>", '
                f"found {frame[:40]!r}"
            )
    return frames


def load_frames(path: Path | None, count: int, seed: int) -> tuple[list[bytes], str]:
    """Return the frames to replay and a one-line description of their source.

    Reads ``path`` when given, and otherwise generates ``count`` frames.
    """
    if path is not None:
        return read_frames(path), f"file {path.name}"
    return generate_frames(count, seed), f"gen_frames.py --count {count} --seed {seed}"


def describe_frames(frames: list[bytes]) -> dict:
    """Return size statistics of a frame list, in bytes."""
    sizes = sorted(len(frame) for frame in frames)
    total = sum(sizes)
    ascii_bytes = sum(len(frame.decode("utf-8").encode("ascii", "ignore")) for frame in frames)
    return {
        "frames": len(sizes),
        "total_bytes": total,
        "median_bytes": sizes[len(sizes) // 2],
        "mean_bytes": round(total / len(sizes)),
        "max_bytes": sizes[-1],
        "non_ascii_byte_fraction": round((total - ascii_bytes) / total, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="frames to generate")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument(
        "-o", "--output", type=Path, help="output JSON Lines file (default: stdout)"
    )
    parser.add_argument(
        "--stats", action="store_true", help="print size statistics to stderr"
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")

    frames = generate_frames(args.count, args.seed)
    data = b"".join(frame + b"\n" for frame in frames)
    if args.output is None:
        sys.stdout.buffer.write(data)
    else:
        args.output.write_bytes(data)
    if args.stats:
        print(json.dumps(describe_frames(frames)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
