//! CSV lines as the project writes them (results, predictions, generated datasets): the `csv`
//! crate's RFC 4180 quoting, one line at a time so a long run can flush after every row.

/// One CSV record, terminated by `\n`; fields with `,`, `"`, `\r` or `\n` are quoted.
pub fn csv_line<I, S>(fields: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<[u8]>,
{
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    // Writing into a Vec cannot fail, and every record has its own writer (no field count check).
    let _ = writer.write_record(fields);
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_what_needs_it_including_carriage_returns() {
        assert_eq!(csv_line(["a", "b c", "1.5"]), "a,b c,1.5\n");
        assert_eq!(
            csv_line(["x,y", "say \"hi\"", "line\nbreak", "cr\rhere"]),
            "\"x,y\",\"say \"\"hi\"\"\",\"line\nbreak\",\"cr\rhere\"\n"
        );
    }

    #[test]
    fn round_trips_through_the_csv_reader() {
        let fields = ["odd,name\r\n.jpg", "\"", "", " pad "];
        let line = csv_line(fields);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line.as_bytes());
        let record = reader.records().next().unwrap().unwrap();
        assert_eq!(record.iter().collect::<Vec<_>>(), fields);
    }
}
