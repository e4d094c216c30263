use std::fmt;

/// One problem in a rules file: where it is, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the offending value (0 when the position is unknown).
    pub line: usize,
    /// 1-based column of the offending value (0 when unknown).
    pub column: usize,
    /// Path of the field, e.g. `programs[0].rate` or `codes[2].partner_id`.
    pub field: String,
    /// What is wrong, quoting the bad value.
    pub message: String,
}

/// Why a rules file was refused. A refused file is refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (an external problem).
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid rules file (the user's problem):
    /// every problem found is listed.
    #[error("{}", Invalid { file, problems })]
    Invalid { file: String, problems: Vec<Problem> },
}

struct Invalid<'a> {
    file: &'a str,
    problems: &'a [Problem],
}

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "invalid rules file {}: {n} problem{}", self.file, if n == 1 { "" } else { "s" })?;
        for p in self.problems {
            write!(f, "\n  {}:{}:{}: {}: {}", self.file, p.line, p.column, p.field, p.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The problems of an invalid file (empty for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}
