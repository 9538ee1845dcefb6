"""Built-in vocabularies for the filter (categorical) and binding tasks.

Words are common, mostly single-token nouns. No word belongs to two categories, and no
word is a substring of another built-in word (case-insensitive), so a word's span in a
prompt is never ambiguous; the builders still check this for every prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Category",
    "CATEGORIES",
    "category_names",
    "get_category",
    "BINDING_OBJECTS",
    "BINDING_LETTERS",
]


@dataclass(frozen=True)
class Category:
    """A semantic category: its key, singular / plural names and member words."""

    name: str
    singular: str
    plural: str
    words: tuple[str, ...]


def _cat(name: str, singular: str, plural: str, words: str) -> Category:
    return Category(name, singular, plural, tuple(words.split()))


_ALL = (
    _cat(
        "fruits",
        "fruit",
        "fruits",
        "apple banana grape mango pear strawberry cherry peach plum apricot coconut papaya "
        "raspberry lychee fig lemon watermelon pomegranate tangerine avocado",
    ),
    _cat(
        "animals",
        "animal",
        "animals",
        "horse dog cat lion tiger elephant rabbit monkey zebra giraffe bear wolf fox sheep "
        "goat cow deer camel donkey kangaroo",
    ),
    _cat(
        "vehicles",
        "vehicle",
        "vehicles",
        "car bus truck train bicycle motorcycle boat airplane helicopter tractor van taxi "
        "scooter tram submarine ambulance yacht canoe rocket",
    ),
    _cat(
        "countries",
        "country",
        "countries",
        "France Germany Japan Brazil Canada Mexico India China Italy Spain Egypt Kenya Norway "
        "Sweden Russia Australia Argentina Peru Greece Portugal",
    ),
    _cat(
        "colours",
        "colour",
        "colours",
        "red blue green yellow purple pink brown black white grey silver gold beige turquoise "
        "violet crimson maroon navy ivory magenta",
    ),
    _cat(
        "drinks",
        "drink",
        "drinks",
        "coffee tea milk juice wine beer soda whisky vodka gin cider cocoa smoothie champagne "
        "brandy tequila espresso latte sake",
    ),
    _cat(
        "sports",
        "sport",
        "sports",
        "football tennis golf rugby cricket hockey baseball basketball volleyball swimming "
        "cycling boxing skiing wrestling rowing surfing archery fencing badminton karate",
    ),
    _cat(
        "instruments",
        "musical instrument",
        "musical instruments",
        "piano guitar violin drums flute trumpet cello harp saxophone clarinet trombone banjo "
        "accordion harmonica ukulele oboe tuba xylophone bagpipes mandolin",
    ),
    _cat(
        "tools",
        "tool",
        "tools",
        "hammer screwdriver wrench saw drill pliers shovel axe chisel ladder rake scissors "
        "spanner crowbar trowel stapler mallet clamp",
    ),
    _cat(
        "body_parts",
        "body part",
        "body parts",
        "hand knee elbow shoulder nose eye finger toe ankle wrist neck thumb lip tongue heart "
        "lung stomach brain",
    ),
    _cat(
        "furniture",
        "piece of furniture",
        "pieces of furniture",
        "chair table sofa bed desk shelf bench stool wardrobe cabinet bookcase couch cupboard "
        "sideboard ottoman futon recliner",
    ),
    _cat(
        "clothing",
        "piece of clothing",
        "pieces of clothing",
        "shirt jacket coat dress skirt sweater hat gloves socks boots trousers jeans shorts "
        "belt vest hoodie blouse sandals",
    ),
)

#: Built-in categories by name.
CATEGORIES: dict[str, Category] = {c.name: c for c in _ALL}

#: Objects for the binding task (common, short nouns; none a substring of another).
BINDING_OBJECTS: tuple[str, ...] = tuple(
    [
        "apple",
        "book",
        "key",
        "ball",
        "hat",
        "cup",
        "pen",
        "shoe",
        "coin",
        "ring",
        "watch",
        "phone",
        "bag",
        "lamp",
        "clock",
        "bell",
        "doll",
        "fork",
        "kite",
        "map",
        "toy",
        "egg",
        "fish",
        "bottle",
        "camera",
        "cake",
        "spoon",
        "candle",
        "brush",
        "knife",
        "plate",
    ]
)

#: Box letters: capital letters without I, O and Q (easily confused with 1, 0 and O).
BINDING_LETTERS: tuple[str, ...] = tuple(c for c in "ABCDEFGHJKLMNPRSTUVWXYZ")


def category_names() -> list[str]:
    """Names of the built-in categories, in a fixed order."""
    return list(CATEGORIES)


def get_category(name: str) -> Category:
    """The built-in category ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return CATEGORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown category {name!r}; valid categories: {category_names()}"
        ) from None
