"""mpify_fastai: run notebook-defined functions, and fastai training, on N processes; get everything back."""
__version__ = '0.1.0'
from .errors import LaunchError, WorkerError, WorkerDied, LaunchTimeout, MainGuardError, PayloadError
from .imports import ImportsError, import_star
from .launch import ranch, send_event

__all__ = ['ranch', 'send_event', 'import_star', 'LaunchError', 'WorkerError', 'WorkerDied', 'LaunchTimeout',
           'MainGuardError', 'PayloadError', 'ImportsError']
