"""Unit tests of imports.py: the `imports=` text that workers run before the user's function."""
import ast, sys
import pytest
from mpify_fastai.imports import ImportsError, import_star, parse_imports, run_imports

MULTI = '''
# leading comment
import os
import json as js, collections.abc
from collections import (
    OrderedDict,          # a comment inside the parentheses
    defaultdict as dd,
)
from os.path import join, \\
    basename as bn

from math import *   # trailing comment
'''

def test_parse_multiline_aliases_parentheses_comments_star():
    tree = parse_imports(MULTI)
    assert isinstance(tree, ast.Module)
    kinds = [type(n).__name__ for n in tree.body]
    assert kinds == ['Import', 'Import', 'ImportFrom', 'ImportFrom', 'ImportFrom']
    assert [(a.name, a.asname) for a in tree.body[1].names] == [('json', 'js'), ('collections.abc', None)]
    assert [(a.name, a.asname) for a in tree.body[2].names] == [('OrderedDict', None), ('defaultdict', 'dd')]
    assert [(a.name, a.asname) for a in tree.body[3].names] == [('join', None), ('basename', 'bn')]
    assert tree.body[4].module == 'math' and tree.body[4].names[0].name == '*'

def test_run_imports_binds_every_form():
    import collections, json, math, os
    ns = run_imports(MULTI, {})
    assert ns['os'] is os and ns['js'] is json and ns['collections'] is collections
    assert ns['OrderedDict'] is collections.OrderedDict and ns['dd'] is collections.defaultdict
    assert ns['join'] is os.path.join and ns['bn'] is os.path.basename
    assert ns['sqrt'] is math.sqrt and ns['pi'] == math.pi          # from math import *
    assert 'json' not in ns and 'defaultdict' not in ns and 'basename' not in ns   # aliases only

@pytest.mark.parametrize('src', ['', '   \n', '# only a comment\n\n# another'])
def test_empty_and_comment_only(src):
    assert parse_imports(src).body == []
    assert run_imports(src, {}) == {}

@pytest.mark.parametrize('src,line,text', [
    ('x = 1', 1, 'x = 1'),
    ('import os\nprint("hi")', 2, "print(\"hi\")"),
    ('import os\n\ndef f():\n    import sys\n', 3, 'def f():'),
    ('if True:\n    import os', 1, 'if True:'),
    ('import os; os.system("echo hacked")', 1, 'os.system("echo hacked")'),
    ('try:\n    import numpy\nexcept ImportError:\n    pass', 1, 'try:'),
])
def test_rejects_non_import_statements(src, line, text):
    with pytest.raises(ImportsError) as ei:
        parse_imports(src)
    msg = str(ei.value)
    assert 'only import statements' in msg and f'line {line}' in msg and text in msg
    assert isinstance(ei.value, ValueError)

def test_rejected_text_is_never_executed(tmp_path):
    marker = tmp_path / 'ran'
    with pytest.raises(ImportsError):
        run_imports(f'import os\nopen({str(marker)!r}, "w").close()', {})
    assert not marker.exists()

@pytest.mark.parametrize('src,line', [('import os\nfrom collections import (OrderedDict', 2), ('import', 1),
                                      ('from math import sqrt as', 1), ('import os\n  import sys', 2)])
def test_syntax_error_has_clear_message(src, line):
    with pytest.raises(ImportsError) as ei:
        parse_imports(src)
    msg = str(ei.value)
    assert msg.startswith('imports has a syntax error') and f'line {line}' in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__   # short: no chained SyntaxError dump

@pytest.mark.parametrize('src', ['from . import helpers', 'from .sub import x', 'import os\nfrom ..pkg import y'])
def test_relative_imports_rejected(src):
    with pytest.raises(ImportsError, match='relative imports'):
        parse_imports(src)

@pytest.mark.parametrize('bad', [None, b'import os', ['import os'], 3])
def test_non_string_rejected(bad):
    with pytest.raises(ImportsError, match='string of import statements'):
        parse_imports(bad)

def test_missing_module_raises_at_run_time_not_parse_time():
    parse_imports('import no_such_module_mpify_xyz')     # syntax is fine
    with pytest.raises(ModuleNotFoundError):
        run_imports('import no_such_module_mpify_xyz', {})

def test_run_imports_does_not_touch_caller_namespace():
    main = sys.modules['__main__'].__dict__
    glob_before, main_before = dict(globals()), dict(main)
    local_sentinel = 1
    ns = {'keep': 42}
    out = run_imports('from fractions import Fraction\nimport decimal as dec', ns)
    assert out is ns and ns['keep'] == 42
    from fractions import Fraction
    assert ns['Fraction'] is Fraction and ns['dec'] is sys.modules['decimal']
    assert globals().keys() == glob_before.keys() and 'dec' not in globals()
    assert main.keys() == main_before.keys()
    assert set(locals()) >= {'local_sentinel', 'ns'} and 'dec' not in locals()

def test_import_star_into_dict_respects_all_and_privacy():
    import json, fractions
    d = import_star('json, fractions', {})
    assert d['dumps'] is json.dumps and d['Fraction'] is fractions.Fraction
    assert 'decoder' not in d                 # json.decoder is public-looking but not in json.__all__
    assert not any(k.startswith('_') for k in d)
    d2 = import_star(['colorsys'], {})       # no __all__: public names only
    import colorsys
    assert d2['rgb_to_hsv'] is colorsys.rgb_to_hsv and not any(k.startswith('_') for k in d2)

def test_import_star_default_namespace_is_callers_globals():
    assert 'rgb_to_hls' not in globals()
    try:
        import_star('colorsys')
        assert 'rgb_to_hls' in globals()
    finally:
        import colorsys
        for k in [k for k in vars(colorsys) if not k.startswith('_')]:
            globals().pop(k, None)

def test_import_star_unknown_module():
    with pytest.raises(ModuleNotFoundError):
        import_star('no_such_module_mpify_xyz', {})
