"""Figures, report sections and the offline HTML report; reads saved artifacts only."""

from .html import SECTION_FILE, build_report, find_sections, report_run_folder, write_section

__all__ = ["SECTION_FILE", "build_report", "find_sections", "report_run_folder", "write_section"]
