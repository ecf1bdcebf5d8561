// The JupyterLab side of stacker-kernel: a terminal in the notebook's image (toolbar
// button and %shell) and "Open as stacker notebook" for Dockerfiles and stacker.yaml.
// The server side is stacker_kernel/labextension/handlers.py.
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { showErrorMessage, ToolbarButton } from '@jupyterlab/apputils';
import { IFileBrowserFactory } from '@jupyterlab/filebrowser';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

const SHELL_MIME = 'application/vnd.stacker-kernel.shell+json';
const OPEN_AS_NOTEBOOK = 'stacker-kernel:open-as-notebook';
const OPEN_SHELL = 'stacker-kernel:shell';
const RECIPE_RE = /(^|\.)(dockerfile|containerfile)(\.|$)|^stacker\.ya?ml$|\.stacker\.ya?ml$/i;

async function post(path: string, body: object): Promise<any> {
  const settings = ServerConnection.makeSettings();
  const url = settings.baseUrl + 'stacker-kernel/' + path;
  const response = await ServerConnection.makeRequest(
    url,
    { method: 'POST', body: JSON.stringify(body) },
    settings
  );
  let data: any = {};
  try {
    data = await response.json();
  } catch {
    data = {};
  }
  if (!response.ok) {
    throw new Error(data.message || response.statusText);
  }
  return data;
}

async function openShell(app: JupyterFrontEnd, body: object): Promise<void> {
  try {
    const { name } = await post('shell', body);
    await app.commands.execute('terminal:open', { name });
  } catch (e) {
    void showErrorMessage('Terminal in the image', String((e as Error).message || e));
  }
}

// The toolbar button asks the kernel (`%shell`, kept out of the history) so that a kept
// failed state is frozen for the terminal first; without a kernel, the server opens the
// notebook's last build.
async function shellFromPanel(app: JupyterFrontEnd, panel: NotebookPanel): Promise<void> {
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return openShell(app, { path: panel.context.path });
  }
  let opened = false;
  let failure = '';
  const future = kernel.requestExecute({ code: '%shell', silent: false, store_history: false });
  future.onIOPub = msg => {
    const content = msg.content as any;
    if (msg.header.msg_type === 'display_data' && content.data?.[SHELL_MIME] && !opened) {
      const data = content.data[SHELL_MIME];
      opened = true;
      ShellOutput.opened.add(data.nonce);
      void openShell(app, { notebook: data.notebook });
    } else if (msg.header.msg_type === 'error') {
      failure = `${content.ename}: ${content.evalue}`;
    }
  };
  await future.done;
  if (!opened) {
    void showErrorMessage('Terminal in the image', failure || 'the kernel did not answer %shell');
  }
}

// Rendered %shell output: opens the terminal once while fresh (a reopened notebook
// does not), and keeps a button to open another.
class ShellOutput extends Widget implements IRenderMime.IRenderer {
  static opened = new Set<string>();

  constructor(private app: JupyterFrontEnd) {
    super();
    this.addClass('jp-StackerShell-output');
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const data = model.data[SHELL_MIME] as any;
    this.node.textContent = '';
    const text = document.createElement('pre');
    text.textContent =
      'A terminal in a throwaway copy of this notebook\'s state: nothing done there is kept.\n' +
      'From a shell: ' + data.command;
    const button = document.createElement('button');
    button.className = 'jp-Button jp-mod-styled jp-mod-accept';
    button.textContent = 'Open terminal in the image';
    button.onclick = () => void openShell(this.app, { notebook: data.notebook });
    this.node.append(text, button);
    if (!ShellOutput.opened.has(data.nonce) && Date.now() / 1000 < data.expires) {
      ShellOutput.opened.add(data.nonce);
      void openShell(this.app, { notebook: data.notebook });
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'stacker-kernel-extension:plugin',
  description: 'stacker-kernel: terminal in the image, Open as stacker notebook',
  autoStart: true,
  requires: [IFileBrowserFactory, IRenderMimeRegistry],
  optional: [INotebookTracker],
  activate: (
    app: JupyterFrontEnd,
    browsers: IFileBrowserFactory,
    rendermime: IRenderMimeRegistry,
    notebooks: INotebookTracker | null
  ) => {
    rendermime.addFactory(
      {
        safe: false,
        mimeTypes: [SHELL_MIME],
        createRenderer: () => new ShellOutput(app)
      },
      0
    );

    app.commands.addCommand(OPEN_SHELL, {
      label: 'Terminal in the image',
      caption: 'Open a terminal in a throwaway copy of this notebook\'s current (or failed) state',
      execute: async () => {
        const panel = notebooks?.currentWidget;
        if (panel) {
          await shellFromPanel(app, panel);
        }
      }
    });
    const addButton = (panel: NotebookPanel) => {
      const button = new ToolbarButton({
        label: 'Terminal in image',
        tooltip: 'Open a terminal in a throwaway copy of this notebook\'s current (or failed) state',
        onClick: () => void shellFromPanel(app, panel)
      });
      button.addClass('jp-StackerShell-button');
      panel.toolbar.insertItem(10, 'stacker-shell', button);
    };
    notebooks?.widgetAdded.connect((_, panel) => {
      void panel.sessionContext.ready.then(() => {
        const name = panel.sessionContext.session?.kernel?.name ?? '';
        if (name.startsWith('stacker')) {
          addButton(panel);
        }
      });
    });

    app.commands.addCommand(OPEN_AS_NOTEBOOK, {
      label: 'Open as stacker notebook',
      isVisible: () => {
        const item = browsers.tracker.currentWidget?.selectedItems().next();
        return !!item && !item.done && item.value.type !== 'directory' && RECIPE_RE.test(item.value.name);
      },
      execute: async args => {
        let path = args.path as string | undefined;
        if (!path) {
          const item = browsers.tracker.currentWidget?.selectedItems().next();
          path = item && !item.done ? item.value.path : undefined;
        }
        if (!path) {
          return;
        }
        try {
          const result = await post('open-as-notebook', { path });
          await browsers.tracker.currentWidget?.model.refresh();
          await app.commands.execute('docmanager:open', { path: result.path, factory: 'Notebook' });
        } catch (e) {
          void showErrorMessage('Open as stacker notebook', String((e as Error).message || e));
        }
      }
    });
    app.contextMenu.addItem({
      command: OPEN_AS_NOTEBOOK,
      selector: '.jp-DirListing-item[data-isdir="false"]',
      rank: 2
    });
  }
};

export default plugin;
