"""Task data: contrast records and the built-in filter and binding tasks (METHOD §4).

Every task produces :class:`ContrastRecord` objects: a prompt with *character* spans for
the query and the positive / negative keys. A runner maps them to token positions.
"""

from __future__ import annotations

from .binding import BindingTaskConfig, binding_prompt, build_binding_records
from .filter import (
    FilterTaskConfig,
    build_filter_records,
    check_words_tokenize,
    filter_question,
    make_filter_record,
)
from .records import (
    ContrastRecord,
    Span,
    find_spans,
    load_records,
    parse_records,
    save_records,
)
from .vocab import BINDING_LETTERS, BINDING_OBJECTS, CATEGORIES, Category, category_names

__all__ = [
    "Span",
    "ContrastRecord",
    "find_spans",
    "load_records",
    "parse_records",
    "save_records",
    "Category",
    "CATEGORIES",
    "category_names",
    "BINDING_OBJECTS",
    "BINDING_LETTERS",
    "FilterTaskConfig",
    "build_filter_records",
    "make_filter_record",
    "filter_question",
    "check_words_tokenize",
    "BindingTaskConfig",
    "build_binding_records",
    "binding_prompt",
]
