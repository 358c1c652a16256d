"""Small fixes to the HTML pages of the book (registered in _config.yml under sphinx.local_extensions).

sphinx-thebe (which Jupyter Book always loads) adds its inline configuration script once per
read of the sources (sphinx-togglebutton likewise), so every page declared ``const THEBE_JS_URL``
twice and the browser logged "Identifier 'THEBE_JS_URL' has already been declared" on every page.
Each page now gets each script once, in its first position.
"""


def _script_key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # an inline script's filename is None when one extension adds it and "" when another does
    return getattr(script, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attributes.items()))


def unique_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: handlers after this one (MathJax's) add to the same list


def setup(app):
    app.connect("html-page-context", unique_scripts, priority=100)  # before any handler that returns a template
    return {"parallel_read_safe": True, "parallel_write_safe": True}
