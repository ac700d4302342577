//! PyO3 bindings for ringcast-core (`ringcast._core`): type and error translation only, one
//! file per concept: `errors` (the exception tree and the one conversion of core errors),
//! `segment` (`Segment`, `SessionInfo`, `SegmentStats`), `stream` (`Writer`, `Reader`),
//! `notifier` (`Notifier`), `fanout` (`SocketFanOut`, `SentCounter`) and `steer`
//! (`steer_accepts`). Nothing here imports a Python module: `Reader.aread` is written in Python
//! (`ringcast._aio`) on top of `Reader.notifier()`.

mod errors;
mod fanout;
mod notifier;
mod segment;
mod steer;
mod stream;

use pyo3::prelude::*;

use ringcast_core as core;

#[pymodule]
fn _core(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::add_exceptions(py, m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("LAYOUT_VERSION", core::LAYOUT_VERSION)?;
    m.add("MAX_PROCESSES", core::MAX_PROCESSES)?;
    m.add_class::<segment::Segment>()?;
    m.add_class::<stream::Writer>()?;
    m.add_class::<stream::Reader>()?;
    m.add_class::<fanout::SocketFanOut>()?;
    m.add_class::<fanout::SentCounter>()?;
    m.add_class::<notifier::Notifier>()?;
    m.add_class::<segment::SessionInfo>()?;
    m.add_class::<segment::SegmentStats>()?;
    m.add_function(wrap_pyfunction!(steer::steer_accepts, m)?)?;
    Ok(())
}
