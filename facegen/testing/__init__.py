"""Tiny fixture sources and tiny random-weight models, public for plugin authors and used by facegen's tests.

Each layout has its own module (``facegen.testing.folder``, ``.digiface``, ``.sfhq``, ``.disco``, ``.arc2face``,
``.stylegan``); the common writers are re-exported here.
"""
