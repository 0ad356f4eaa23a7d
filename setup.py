"""Package metadata comes from settings.ini (the fastai-family convention)."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser()
cfg.read('settings.ini')
cfg = cfg['DEFAULT']

setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'], author=cfg['author'],
    license=cfg['license'], keywords=cfg['keywords'].split(), python_requires=f">={cfg['min_python']},<3.{int(cfg['max_python'].split('.')[1]) + 1}",
    packages=find_packages(include=[cfg['lib_name'], f"{cfg['lib_name']}.*"]),
    install_requires=cfg['requirements'].split(), extras_require={'test': cfg['test_requirements'].split(), 'slurm': cfg['slurm_requirements'].split(),
                    'dev': cfg['test_requirements'].split() + cfg['dev_requirements'].split()},
    long_description=open('README.md').read(), long_description_content_type='text/markdown', license_files=['LICENSE'],
)
