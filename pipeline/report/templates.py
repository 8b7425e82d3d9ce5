"""The report document as Jinja2 templates: one text for both formats, blocks per format.

``document`` holds the sections and the definitions the report restates, written once. It draws
every block (heading, paragraph, image, table, list) through the macros of ``blocks.md`` or
``blocks.html``, picked by the ``fmt`` variable; ``report.md`` and ``report.html`` wrap it in a
page. Literal text is written as is in both formats (only variables are escaped in HTML), so it
must hold no ``<`` or ``&``. Blank lines are free: :mod:`pipeline.report.render` collapses them.

Kept in Python rather than as ``.j2`` files so that they ship inside the package without package
data settings.
"""

from __future__ import annotations

__all__ = ["TEMPLATES"]

_DOCUMENT = """\
{% import "blocks." ~ fmt as f %}
{{ f.h(1, "Noisy Student report: run " ~ run) }}
{% call f.p() %}
Generated {{ when }} from manifests/{{ run }} under {{ root }}; {{ scope }};
{{ n_classes }} classes. Every table is also a CSV in this folder.
{% endcall %}
{% if notes %}
{{ f.h(2, "Notes") }}
{{ f.ul(notes) }}
{% endif %}

{{ f.h(2, "Rounds") }}
{{ f.img(top1_plot, "top-1 by round") }}
{{ f.table(rounds_model) }}
{% call f.p() %}
top1/top5/loss: test split, fractions. teacher_top1: the model that made this round's
pseudo-labels; gain = top1 - teacher_top1. ece: expected calibration error of this round's model
on the test split.
{% endcall %}
{{ f.table(rounds_pseudo_labels) }}
{% call f.p() %}
pseudo_labels/kept/with_copies are counted in the Parquet files when the round was scanned (else
the manifest's); kept: distinct rows with copies >= 1; with_copies: sum of copies. precision: share
of pseudo-labels matching the held-out truth; precision_kept: on the distinct kept rows;
precision_copies: each row weighted by its copies (the labels the student trains on);
micro-averaged over classes; truth_coverage: share of rows with a truth label. flip_rate: share of
keys whose label differs from the previous round's pseudo-labels.
{% endcall %}
{{ f.table(rounds_seconds) }}
{% call f.p() %}Wall time of each stage in seconds, from the manifests.{% endcall %}

{% for s in pseudo_label_rounds %}
{{ f.h(2, "Round " ~ s.round ~ ": pseudo-labels (teacher: round " ~ (s.round - 1) ~ ")") }}
{% call f.p() %}
threshold {{ s.settings.threshold | fmt }}, K {{ s.settings.k | fmt }};
pseudo-labels {{ s.settings.pseudo_labels | fmt }}, kept {{ s.settings.kept | fmt }},
with copies {{ s.settings.with_copies | fmt }};
bad samples skipped {{ s.settings.bad_samples | fmt }}.
{% endcall %}
{{ f.img(s.confidence_plot, "confidence and entropy, round " ~ s.round) }}
{{ f.img(s.classes_plot, "class distribution, round " ~ s.round) }}
{{ f.table(s.per_class) }}
{% call f.p() %}
kept/copies: counted in the files (rows with copies >= 1; sum of copies); manifest_*: what the
manifest records. median_confidence comes from a 1000-bin histogram (within 0.001 of the exact
median when the class has many rows). Histograms (50 fixed bins) are in histograms.csv.
{% endcall %}
{% endfor %}

{% if flips %}
{{ f.h(2, "Agreement between consecutive teachers") }}
{{ f.table(flips) }}
{% call f.p() %}
Round a's and round b's pseudo-labels (made by teachers a-1 and b-1), rows of the same shard file
joined by key. common: keys in both; flipped: of those, labels that changed; only_a/only_b: keys
in one round only; *_kept: keys kept (copies >= 1) in both rounds. The whole flip matrix is
flip_matrix.csv (non-zero cells).
{% endcall %}
{% for pair in flip_pairs %}
{{ f.h(3, "Per class, rounds " ~ pair.a ~ " -> " ~ pair.b) }}
{% if pair.plot %}
{{ f.img(pair.plot, "flip matrix, rounds " ~ pair.a ~ " to " ~ pair.b) }}
{% endif %}
{{ f.table(pair.class_changes) }}
{% endfor %}
{% endif %}

{% if calibration %}
{{ f.h(2, "Calibration of each round's model (the next round's teacher)") }}
{{ f.table(calibration) }}
{% if reliability_plot %}
{{ f.img(reliability_plot, "reliability diagram") }}
{% endif %}
{% call f.p() %}
ECE over {{ ece_bins }} equal-width confidence bins (lo, hi]: the sum over bins of (rows in bin /
rows) x |accuracy - mean confidence|; the bins are in reliability.csv.
{% endcall %}
{% endif %}

{{ f.h(2, "Files") }}
{{ f.links(csv_files) }}
"""

# Markdown blocks need a blank line on each side, so every macro adds them (the extra ones are
# collapsed); a table is followed by its caption, which links the table's CSV.
_BLOCKS_MD = """\
{% macro h(level, text) %}

{{ "#" * level }} {{ text }}

{% endmacro %}
{% macro p() %}

{{ caller() | squash }}

{% endmacro %}
{% macro img(src, alt) %}

![{{ alt }}]({{ src }})

{% endmacro %}
{% macro table(t) %}

{{ t.rows | markdown_table }}

({{ t.lead }}[{{ t.csv }}]({{ t.csv }}))

{% endmacro %}
{% macro ul(items) %}

{% for x in items %}
- {{ x }}
{% endfor %}

{% endmacro %}
{% macro links(names) %}

{% for x in names %}
- [{{ x }}]({{ x }})
{% endfor %}

{% endmacro %}
"""

_BLOCKS_HTML = """\
{% macro h(level, text) %}
<h{{ level }}>{{ text }}</h{{ level }}>
{% endmacro %}
{% macro p() %}
<p>{{ caller() | squash }}</p>
{% endmacro %}
{% macro img(src, alt) %}
<p><img src='{{ src }}' alt='{{ alt }}'></p>
{% endmacro %}
{% macro table(t) %}
{{ t.rows | html_table }}<p>({{ t.lead }}<a href='{{ t.csv }}'>{{ t.csv }}</a>)</p>
{% endmacro %}
{% macro ul(items) %}
<ul>{% for x in items %}<li>{{ x }}</li>{% endfor %}</ul>
{% endmacro %}
{% macro links(names) %}
<ul>{% for x in names %}<li><a href='{{ x }}'>{{ x }}</a></li>{% endfor %}</ul>
{% endmacro %}
"""

_PAGE_HTML = """\
<!doctype html><html><head><meta charset='utf-8'><title>{{ run }} report</title><style>\
body{font-family:sans-serif;max-width:1200px;margin:auto}\
table{border-collapse:collapse;font-size:12px}\
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}\
img{max-width:100%}</style></head><body>
{% include "document" %}
</body></html>
"""

TEMPLATES = {
    "document": _DOCUMENT,
    "blocks.md": _BLOCKS_MD,
    "blocks.html": _BLOCKS_HTML,
    "report.md": '{% include "document" %}\n',
    "report.html": _PAGE_HTML,
}
